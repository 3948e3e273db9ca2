"""Tiny models of the real architectures, for the demo, the tests and the benchmarks.

`make_tiny_lm` writes a model directory that loads exactly like a real Mistral checkpoint
(`AutoTokenizer.from_pretrained(dir)`, `AutoModelForCausalLM.from_pretrained(dir)`): a
`MistralForCausalLM` a few hundred kB in size and a byte-level BPE tokenizer trained here on the
project's own texts (the Gemini captions and summaries plus every prompt template, so that the
prompts tokenise into words rather than bytes). Nothing is downloaded. `arch="llama"` / `"qwen2"`
write a tiny `LlamaForCausalLM` (Llama 3.x: theta 5e5, llama3 rope scaling) / `Qwen2ForCausalLM`
(Qwen2.5: biased q/k/v, tied embeddings) with the same tokenizer instead; `"mistral"` is the default.

The LM stands in for a *pretrained* Mistral, so it is briefly pre-trained here (a few seconds on
one CPU thread, deterministic) on the same texts: a frozen *random* LM barely learns under LoRA
(its random output layer and final norm cap the logit scale, its random features give the
adapters little to work with), which would make every "does training work" check meaningless.

    python -m tiny_models.lm --out /tmp/tiny_lm --gemini-json a.json b.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from common.cli import cli_main
from models.cond_names import COND_NAMES
from models.tasks import TASKS, TaskUnavailable, build_prompt
from tiny_models.stage1 import save_tiny_stage1

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3, in this order


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

def _cases(data) -> list:
    """The case list of a Gemini JSON document: a list, {"cases": [...]}, or {id: case, ...}."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if isinstance(data.get("cases"), list):
            return data["cases"]
        return [v for v in data.values() if isinstance(v, dict)]
    return []


def _gemini_cases(paths: Iterable[str | Path]) -> Iterator[tuple[str | None, list[tuple[str, str]]]]:
    """(global_summary or None, [(cond_name, caption), ...]) per case, read tolerantly (a corpus only)."""
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the Gemini JSON for the tokenizer corpus: {e}") from e
        for case in _cases(data):
            if not isinstance(case, dict):
                continue
            summary = case["global_summary"] if isinstance(case.get("global_summary"), str) else None
            captions = [(el["cond_name"] if isinstance(el.get("cond_name"), str) else "", el["caption"])
                        for el in case.get("elements") or []
                        if isinstance(el, dict) and isinstance(el.get("caption"), str)]
            yield summary, captions


def gemini_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Summaries and captions of Gemini JSON files, read tolerantly (this is only a corpus)."""
    for summary, captions in _gemini_cases(paths):
        if summary is not None:
            yield summary
        for _, caption in captions:
            yield caption


def gemini_prompt_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every caption and summary inside its task's prompt (`[INST] ... [/INST] target`), as the
    fine-tuning will show them, so pre-training sees the instruction format too."""
    for summary, captions in _gemini_cases(paths):
        for cond, caption in captions:
            p = build_prompt("caption", cond_name=cond, caption=caption, with_image=False)
            yield p.text + p.target
        if summary is not None:
            cond = captions[0][0] if captions else ""
            p = build_prompt("summary", cond_name=cond, global_summary=summary, with_image=False)
            yield p.text + p.target


def prompt_texts() -> Iterator[str]:
    """Every task's prompt wording, for every image type, so template words become tokens."""
    caption = "First sentence. Second sentence. Third sentence. Fourth sentence."
    for task in TASKS:
        for cond in COND_NAMES:
            for with_image in (True, False):
                try:
                    p = build_prompt(task, cond_name=cond, caption=caption, global_summary="Summary.",
                                     case_captions=[caption], with_image=with_image)
                except TaskUnavailable:
                    continue
                yield p.text


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (lossless on any text) with Mistral's special-token conventions.

    Like Mistral's tokenizer it prepends BOS (and not EOS) when `add_special_tokens=True`;
    `models.tasks` tokenises with `add_special_tokens=False` and adds BOS/EOS itself.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def tiny_mistral_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, bos_token_id: int = 1,
                        eos_token_id: int = 2, pad_token_id: Optional[int] = None) -> MistralConfig:
    """The Mistral architecture (GQA 4:2 heads, SwiGLU, RMSNorm, RoPE) at toy width."""
    return MistralConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden_size // 4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, bos_token_id: int = 1,
                      eos_token_id: int = 2, pad_token_id: Optional[int] = None) -> LlamaConfig:
    """The Llama 3.x architecture (GQA 4:2 heads, SwiGLU, RMSNorm, RoPE theta 5e5 with Llama 3.1's
    'llama3' frequency scaling, untied head) at toy width."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden_size // 4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       rope_parameters=rope, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def tiny_qwen2_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, bos_token_id: int = 1,
                      eos_token_id: int = 2, pad_token_id: Optional[int] = None) -> Qwen2Config:
    """The Qwen2 / Qwen2.5 architecture (GQA 4:2 heads, bias on q/k/v, SwiGLU, RMSNorm, RoPE theta
    1e6, no sliding window, input and output embeddings tied like the small Qwen2.5 models) at toy width."""
    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False,
                       tie_word_embeddings=True, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id)


class TinyArch(NamedTuple):
    config: Callable[..., PretrainedConfig]  # (vocab_size, hidden_size, num_layers, bos, eos, pad)
    model_class: type[PreTrainedModel]


TINY_ARCHS = {"mistral": TinyArch(tiny_mistral_config, MistralForCausalLM),
              "llama": TinyArch(tiny_llama_config, LlamaForCausalLM),
              "qwen2": TinyArch(tiny_qwen2_config, Qwen2ForCausalLM)}


@dataclass(frozen=True)
class PretrainConfig:
    """A short next-token pre-training run: enough for the tiny LM to behave like a pretrained one
    (a calibrated output layer, features that carry the domain's words), cheap on one CPU thread."""

    steps: int = 200
    batch_size: int = 8  # chunks per step
    seq_len: int = 128  # tokens per chunk
    lr: float = 1e-2
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0


def token_stream(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """All documents as one long `BOS text EOS BOS text EOS ...` stream of token ids."""
    ids: list[int] = []
    for doc in documents:
        ids += [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model: PreTrainedModel, stream: torch.Tensor, cfg: PretrainConfig, seed: int = 0) -> list[float]:
    """Train all weights of `model` on random chunks of `stream` (next-token prediction, AdamW).

    Deterministic: chunk offsets come from a seeded generator and the run uses one thread (a
    CPU matmul's summation order, hence its bits, can depend on the thread count). Returns the
    per-step losses.
    """
    if cfg.steps <= 0:
        return []
    span = cfg.seq_len
    if len(stream) < span:  # a tiny corpus: repeat it so one chunk fits
        stream = stream.repeat(-(-span // len(stream)))
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for step in tqdm(range(cfg.steps), desc="tiny LM pre-training", unit="step", leave=False, disable=None):
            starts = torch.randint(0, len(stream) - span + 1, (cfg.batch_size,), generator=gen)
            chunk = torch.stack([stream[i:i + span] for i in starts.tolist()])
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = model(input_ids=chunk, labels=chunk).loss  # HF shifts the labels
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return losses


def make_tiny_lm(out_dir: str | Path, corpus_json: Sequence[str | Path] | None = None,
                 corpus_texts: Sequence[str] | None = None, vocab_size: int = 1024, hidden_size: int = 64,
                 num_layers: int = 2, seed: int = 0, pretrain_steps: int = 200, arch: str = "mistral") -> Path:
    """Write a tiny, briefly pre-trained causal LM (`arch`: mistral, llama or qwen2; see `TINY_ARCHS`)
    + a locally trained tokenizer as a model dir.

    The LM stands in for a *pretrained* Mistral: after the random init all its weights train for
    `pretrain_steps` steps of next-token prediction on the corpus (the Gemini summaries and
    captions, each also inside its task prompt, the extra texts and the prompt templates), so
    LoRA on it learns like LoRA on a real LM. A frozen random LM cannot: its random output layer
    and final norm cap the logit scale, and its random features give the adapters little to use.
    `pretrain_steps=0` writes the random model.

    Deterministic for given texts and arguments. The files are written into a temp directory and
    moved into `out_dir` one by one, so a killed run never leaves a half-written file there.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r}; choices: {sorted(TINY_ARCHS)}")
    out_dir = Path(out_dir)
    corpus_json = list(corpus_json or ())
    texts = list(gemini_texts(corpus_json)) + list(corpus_texts or ()) + list(prompt_texts())
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = TINY_ARCHS[arch].config(len(tokenizer), hidden_size, num_layers, tokenizer.bos_token_id,
                                     tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TINY_ARCHS[arch].model_class(config)
        documents = texts + list(gemini_prompt_documents(corpus_json))
        pretrain(model, token_stream(tokenizer, documents), PretrainConfig(steps=pretrain_steps), seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _portable_tokenizer_class(config_path: Path) -> None:
    """Name the class both transformers 4 and 5 resolve (v5 writes its own 'TokenizersBackend')."""
    cfg = json.loads(config_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")


@cli_main
def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description="Write a tiny Mistral (or Llama / Qwen2) + tokenizer, both "
                                                 "trained on the given texts")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--arch", choices=sorted(TINY_ARCHS), default="mistral", help="the LM's architecture")
    parser.add_argument("--gemini-json", nargs="*", default=[], help="Gemini JSON files whose texts train the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=200,
                        help="next-token pre-training steps on the corpus (0: write the random model)")
    parser.add_argument("--stage1-out", default="", help="also write tiny Stage1 encoder/classifier checkpoints here")
    parser.add_argument("--image-size", type=int, default=32, help="image size of the tiny Stage1 models")
    args = parser.parse_args(argv)
    if args.stage1_out:
        enc, cls = save_tiny_stage1(args.stage1_out, image_size=args.image_size, seed=args.seed)
        print(f"wrote tiny Stage1 checkpoints {enc} and {cls}")
    out = make_tiny_lm(args.out, corpus_json=args.gemini_json, vocab_size=args.vocab_size,
                       hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed,
                       pretrain_steps=args.pretrain_steps, arch=args.arch)
    print(f"wrote tiny {args.arch} LM + tokenizer to {out}")
    return out


if __name__ == "__main__":
    main()
