"""Random-weight model directories that load exactly like the real checkpoints (nothing is downloaded).

    python -m benchmarks.make_random_model --shape 7b --out /tmp/mistral7b-random \\
        --gemini-json data/gemini_element_captions_2014-2016.json --stage1-out /tmp/stage1-random
    python -m benchmarks.make_random_model --shape llama3-8b --out /tmp/llama3-8b-random
    python -m benchmarks.make_random_model --shape tiny --out /tmp/tiny_lm --stage1-out /tmp/stage1

LM (`--out`): `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`
work on it as on a downloaded model of that architecture:
- `--shape 7b`: `benchmarks.make_random_model.mistral_7b_shape_config()` (Mistral-7B v0.3: 32 layers, 4096 hidden,
  vocab 32768) with random weights, initialised on the GPU when there is one (seconds instead of
  minutes on a CPU), written as bf16 safetensors in `--max-shard-size` pieces plus the index.
  The values are random, so only speed and memory results mean anything.
- `--shape llama3-8b`: `llama3_8b_shape_config()` (Llama-3-8B: 32 layers, 4096 hidden, 32 / 8 KV heads,
  14336 MLP, vocab 128256, theta 5e5), `--shape qwen2.5-7b`: `qwen2_5_7b_shape_config()` (Qwen2.5-7B:
  28 layers, 3584 hidden, 28 / 4 KV heads, 18944 MLP, vocab 152064, theta 1e6, biased q/k/v), written
  the same way (`SHAPE_CONFIGS` holds the three).
- `--shape tiny`: `tiny_models.lm.make_tiny_lm` (a few hundred kB).
The tokenizer is the byte-level BPE of `tiny_models.lm`, trained on the Gemini JSON texts (or, without
`--gemini-json`, on the prompt templates only). For the real shapes it is smaller than the config's
vocabulary, which is fine: every id it produces is < vocab_size (checked).

Stage1 (`--stage1-out`): random MAE ViT encoder + EfficientNet classifier checkpoints in the
`{"config", "state_dict"}` layout `models.stage1`'s loaders read (encoder under official-MAE names):
`--stage1-shape vit-b` = ViT-B/16 + EfficientNet-B0 at 224 px (the real sizes, so the real-size shard
builder runs), `tiny` = `tiny_models.stage1.save_tiny_stage1` (32 px). Default: vit-b for the real
shapes, tiny for tiny.
Both are loaded back with the project's loaders before this script returns.

Every file is written into a temp directory next to the target and moved in when complete.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    EfficientNetConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    ViTMAEConfig,
)

from common.config import parse_config, print_config
from common.io import atomic_write_bytes
from common.log import setup_logging
from common.runtime import resolve_device
from models.stage1 import (
    NUM_STAGE1_CLASSES,
    Stage1Classifier,
    Stage1Encoder,
    load_stage1_classifier,
    load_stage1_encoder,
)
from tiny_models.lm import _portable_tokenizer_class, gemini_texts, make_tiny_lm, prompt_texts, train_tokenizer
from tiny_models.stage1 import save_tiny_stage1

log = logging.getLogger("benchmarks.make_random_model")

VIT_B_FILENAME = "vit_b16_mae_random.pt"
EFFNET_B0_FILENAME = "efficientnet_b0_random.pt"


def mistral_7b_shape_config(vocab_size: int = 32768) -> MistralConfig:
    """Mistral-7B (v0.3) shape: 4096 hidden, 32 layers, 14336 MLP, 32 heads / 8 KV heads, theta 1e6."""
    return MistralConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def llama3_8b_shape_config(vocab_size: int = 128256) -> LlamaConfig:
    """Llama-3-8B shape: 4096 hidden, 32 layers, 14336 MLP, 32 heads / 8 KV heads, theta 5e5, vocab 128256."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def qwen2_5_7b_shape_config(vocab_size: int = 152064) -> Qwen2Config:
    """Qwen2.5-7B shape: 3584 hidden, 28 layers, 18944 MLP, 28 heads / 4 KV heads (head dim 128), bias on
    q/k/v, theta 1e6, vocab 152064, untied head (the 7B's; the small Qwen2.5 models tie it)."""
    return Qwen2Config(vocab_size=vocab_size, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2)


# --shape name -> its config (random weights). The tokenizer is the project's local BPE, so the
# special-token ids are its own (bos 1, eos 2), not the real model's.
SHAPE_CONFIGS = {"7b": mistral_7b_shape_config, "llama3-8b": llama3_8b_shape_config,
                 "qwen2.5-7b": qwen2_5_7b_shape_config}
Shape = Literal["tiny", "7b", "llama3-8b", "qwen2.5-7b"]


def shape_config(shape: str, vocab_size: int = 0):
    """The config of a real-size `shape` (vocab_size 0 = the shape's own vocabulary)."""
    if shape not in SHAPE_CONFIGS:
        raise ValueError(f"shape {shape!r} has no config here; real-size shapes: {sorted(SHAPE_CONFIGS)}")
    return SHAPE_CONFIGS[shape](vocab_size) if vocab_size else SHAPE_CONFIGS[shape]()


@dataclass
class RandomModelConfig:
    """Write a random-weight LM directory (+ optional Stage1 checkpoints) that loads like the real ones."""

    out: str = field(default="", metadata={"help": "model directory to write (LM weights, config, tokenizer)"})
    shape: Shape = field(default="tiny", metadata={"help": "tiny test Mistral, or a real shape with random weights: 7b "
                                                         "(Mistral-7B), llama3-8b (Llama-3-8B), qwen2.5-7b (Qwen2.5-7B)"})
    gemini_json: list[str] = field(default_factory=list, metadata={"help": "Gemini JSON files whose texts train the tokenizer"})
    tokenizer_vocab_size: int = field(default=0, metadata={"help": "BPE vocabulary size (0 = 1024 for tiny, 8192 for the real shapes; capped at the model's vocab)"})
    model_vocab_size: int = field(default=0, metadata={"help": "real shapes: the model's vocabulary (embedding rows); 0 = the shape's own (Mistral v0.3 32768, Llama 3 128256, Qwen2.5 152064)"})
    seed: int = field(default=0, metadata={"help": "torch.manual_seed of the weights"})
    device: str = field(default="auto", metadata={"help": "where 7b weights are initialised: auto (cuda if available) | cpu | cuda"})
    max_shard_size: str = field(default="5GB", metadata={"help": "7b: safetensors shard size"})
    stage1_out: str = field(default="", metadata={"help": "also write random Stage1 encoder/classifier checkpoints here"})
    stage1_shape: Literal["auto", "tiny", "vit-b"] = field(default="auto", metadata={"help": "Stage1 size: vit-b (ViT-B/16 MAE + EfficientNet-B0, 224 px), tiny (32 px), auto (vit-b for the real shapes)"})

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out is required (the model directory to write)")
        for path in self.gemini_json:
            if not Path(path).is_file():
                raise ValueError(f"--gemini-json: {path} is not a file")
        if self.tokenizer_vocab_size and self.tokenizer_vocab_size < 260:
            raise ValueError(f"--tokenizer-vocab-size must be >= 260 (bytes + special tokens), got {self.tokenizer_vocab_size}")


# ----------------------------------------------------------------------------------------------
# LM
# ----------------------------------------------------------------------------------------------


def _corpus(gemini_json: Sequence[str]) -> list[str]:
    texts = list(gemini_texts(gemini_json)) + list(prompt_texts())
    if not gemini_json:
        log.warning("no --gemini-json: the tokenizer is trained on the prompt templates only")
    return texts


def _move_into(tmp: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)


def write_random_lm(out_dir: str | Path, config, tokenizer, seed: int = 0, device: str = "auto",
                    max_shard_size: str = "5GB") -> Path:
    """A random-weight causal LM of `config` (its architecture; bf16 safetensors, sharded) + `tokenizer`."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but the model only {config.vocab_size} embedding rows")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    out_dir, dev = Path(out_dir), resolve_device(device)
    start = time.perf_counter()
    torch.manual_seed(seed)
    # Built directly on the device in bf16: a 7B fp32 init on the CPU would need 29 GB and minutes.
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    log.info("initialised %.3fB parameters on %s in %.1f s", n_params / 1e9, dev, time.perf_counter() - start)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        start = time.perf_counter()
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        _move_into(tmp, out_dir)
        log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def write_7b_lm(out_dir: str | Path, gemini_json: Sequence[str] = (), tokenizer_vocab_size: int = 8192,
                model_vocab_size: int = 0, seed: int = 0, device: str = "auto",
                max_shard_size: str = "5GB", shape: str = "7b") -> Path:
    """Random weights of a real-size shape (default Mistral-7B) + a local BPE tokenizer (at most the
    model's vocabulary)."""
    config = shape_config(shape, model_vocab_size)
    tokenizer = train_tokenizer(_corpus(gemini_json), vocab_size=min(tokenizer_vocab_size, config.vocab_size))
    return write_random_lm(out_dir, config, tokenizer, seed, device, max_shard_size)


def write_lm(cfg: RandomModelConfig) -> Path:
    if cfg.shape == "tiny":
        return make_tiny_lm(cfg.out, corpus_json=cfg.gemini_json or None,
                            corpus_texts=None if cfg.gemini_json else ["The image is a map."],
                            vocab_size=cfg.tokenizer_vocab_size or 1024, seed=cfg.seed)
    return write_7b_lm(cfg.out, cfg.gemini_json, cfg.tokenizer_vocab_size or 8192, cfg.model_vocab_size,
                       cfg.seed, cfg.device, cfg.max_shard_size, shape=cfg.shape)


# ----------------------------------------------------------------------------------------------
# Stage1
# ----------------------------------------------------------------------------------------------

# MAE ViT-B/16 (He et al., 2022) encoder, as official-MAE training configs name it.
VIT_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               patch_size=16, image_size=224, num_channels=3, qkv_bias=True, layer_norm_eps=1e-6,
               hidden_act="gelu")
# EfficientNet-B0. transformers' EfficientNetConfig defaults are B7 (width 2.0, depth 3.1, 600 px);
# its per-stage lists are B0's, scaled by these two coefficients.
EFFNET_B0 = dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280, dropout_rate=0.2)


def save_vit_b_stage1(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Random MAE ViT-B/16 + EfficientNet-B0 (224 px) checkpoints; returns (encoder, classifier)."""
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Stage1Encoder(ViTMAEConfig(**VIT_B16, mask_ratio=0.0))
        classifier = Stage1Classifier(EfficientNetConfig(**EFFNET_B0, num_labels=NUM_STAGE1_CLASSES))
    paths = out_dir / VIT_B_FILENAME, out_dir / EFFNET_B0_FILENAME
    payloads = ({"config": dict(VIT_B16), "state_dict": encoder.canonical_state_dict()},
                {"config": classifier.config_dict(), "state_dict": classifier.model.state_dict()})
    for path, payload in zip(paths, payloads):
        payload["state_dict"] = {k: v.detach().contiguous() for k, v in payload["state_dict"].items()}
        buffer = io.BytesIO()  # not the temp file: torch.save names the archive after it
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return paths


def write_stage1(out_dir: str | Path, shape: str, seed: int = 0) -> tuple[Path, Path]:
    """Write and reload (with the project's loaders) the Stage1 checkpoints; returns (encoder, classifier)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    enc, cls = save_vit_b_stage1(out_dir, seed) if shape == "vit-b" else save_tiny_stage1(out_dir, seed=seed)
    encoder, classifier = load_stage1_encoder(enc), load_stage1_classifier(cls)
    log.info("Stage1 %s: encoder %s (%d px, %d blocks, latent %d), classifier %s (%d px)", shape, enc,
             encoder.config.image_size, encoder.num_layers, encoder.latent_dim, cls, classifier.config.image_size)
    return enc, cls


def stage1_shape_for(shape: str, stage1_shape: str = "auto") -> str:
    if stage1_shape != "auto":
        return stage1_shape
    return "tiny" if shape == "tiny" else "vit-b"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def check_loads(model_dir: str | Path, shape: str) -> dict:
    """Load the tokenizer (and, for tiny, the model) the way the trainer does; return a summary."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    ids = tokenizer("Areas affected...portions of southeast OH", add_special_tokens=True)["input_ids"]
    if max(ids) >= config.vocab_size:
        raise RuntimeError(f"{model_dir}: tokenizer id {max(ids)} >= the model's vocab_size {config.vocab_size}")
    if shape == "tiny":  # a 7B load here would double the write time; the trainer loads it anyway

        AutoModelForCausalLM.from_pretrained(model_dir)
    return {"tokenizer_size": len(tokenizer), "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_config(RandomModelConfig, argv)
    setup_logging("benchmarks.make_random_model", rank=0)
    print_config(cfg)
    result: dict = {"model_dir": str(write_lm(cfg))}
    result.update(check_loads(cfg.out, cfg.shape))
    print(f"wrote {cfg.shape} LM to {cfg.out}: vocab {result['vocab_size']} (tokenizer {result['tokenizer_size']}), "
          f"{result['num_hidden_layers']} layers x {result['hidden_size']}")
    if cfg.stage1_out:
        s1 = stage1_shape_for(cfg.shape, cfg.stage1_shape)
        enc, cls = write_stage1(cfg.stage1_out, s1, cfg.seed)
        result.update(stage1_encoder_ckpt=str(enc), stage1_classifier_ckpt=str(cls), stage1_shape=s1)
        print(f"wrote {s1} Stage1 checkpoints {enc} and {cls}")
    return result


if __name__ == "__main__":
    main()
