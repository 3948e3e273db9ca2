"""Export a Stage2 inference checkpoint for use: one self-contained directory, loadable without this trainer.

    python -m eval.export --checkpoint-dir runs/uniform/final --base-model-path /models/mistral-7b --out exported/

The export (built in a temp dir next to --out and renamed into place; an existing --out is replaced
only with --force):

    config.json, model.safetensors (or shards + index), generation_config.json
                        the LM with the LoRA folded into its weights (merged in fp32, then cast to
                        --dtype): a standard AutoModelForCausalLM directory; for a --no-use-lora
                        checkpoint, the fine-tuned LM itself
    tokenizer files     the checkpoint's tokenizer (with its pad token)
    prefix/             the Stage2 prefix (models.prefix_lm.Stage2Prefix.save): projection + class
                        embedding, and the fine-tuned Stage1 tail blocks when the run trained K > 0
    cond_name_to_id.json   image type -> class-embedding id
    stage1.json         which Stage1 encoder/classifier (sha256) and settings the latents must come
                        from: the checkpoint's own Stage1 JSON when it has one, else what its
                        train_config.json records
    export_info.json    source checkpoint, base model, dtype, prefix shape
    train_config.json   the training config (provenance; not needed to load)
    README.md           what each file is and how to load it (models/exported.py)

`models.exported.load_exported` loads it back; generation from the export equals generation from
the checkpoint (tests/test_eval_export.py, token for token in fp32).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from common.cli import UserError, cli_main
from common.config import parse_config, print_config
from common.io import atomic_dir, atomic_write_json, atomic_write_text
from common.runtime import resolve_device, resolve_dtype
from models.cond_names import COND_MAP_FILENAME
from models.exported import EXPORT_INFO_FILE, EXPORT_PREFIX_DIR, EXPORT_README, EXPORT_STAGE1_FILE
from models.image_norm import IMAGE_MEAN, IMAGE_STD
from models.stage1 import Stage1Settings
from trainer.checkpoint import TRAIN_CONFIG_FILE, load_inference_model

EXPORT_FORMAT_VERSION = 1


@dataclass
class ExportConfig:
    """Export a Stage2 checkpoint as a merged Hugging Face LM + prefix modules + tokenizer, ready for use."""

    checkpoint_dir: str = field(default="", metadata={
        "help": "Stage2 inference checkpoint (<output_dir>/final or checkpoint-<step>)"})
    base_model_path: Optional[str] = field(default=None, metadata={
        "help": "local base LM directory; unset: the one recorded at training time"})
    out: str = field(default="exported", metadata={"help": "export directory to create"})
    force: bool = field(default=False, metadata={"help": "replace an existing --out"})
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata={
        "help": "weight dtype of the exported LM; auto = the base model's stored dtype. The LoRA is merged in "
                "fp32 first, so the weights are rounded once"})
    device: str = field(default="cpu", metadata={
        "help": "where the merge runs: cpu (needs ~4 bytes of RAM per LM parameter) | cuda | cuda:N | auto"})

    def validate(self) -> None:
        if not self.checkpoint_dir:
            raise ValueError("--checkpoint-dir is required")
        if not self.out:
            raise ValueError("--out is required")


class ExportError(UserError):
    """The export cannot be written as asked (e.g. --out exists without --force)."""


# ------------------------------------------------------------------------------------ checks
def check_out_dir(out: Path, force: bool, keep: Sequence[Path]) -> None:
    """Refuse an existing `out` unless `force`, and, even with it, an `out` that is or holds a `keep` directory."""
    target = out.resolve()
    for p in keep:
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise ExportError(f"--out {out} is or holds {p}, which the export reads; choose another --out")
    if out.exists() and not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a Hugging Face model directory's config.json records (fp32 when it records none)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    try:
        return resolve_dtype(str(name).removeprefix("torch."))
    except ValueError:
        return torch.float32


# ----------------------------------------------------------------------------------- stage1
def _checkpoint_stage1_file(ckpt_dir: Path) -> Optional[tuple[Path, dict]]:
    """The checkpoint's Stage1 JSON, if it has one: the training shards' manifest stage1 section, which
    trainer.checkpoint writes as `stage1_identity.json` (any `*stage1*.json` is taken, for other versions)."""
    found = []
    for path in sorted(ckpt_dir.glob("*stage1*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ExportError(f"{path}: unreadable Stage1 identity file ({e})") from e
        if isinstance(data, dict) and isinstance(data.get("stage1"), dict):
            data = data["stage1"]
        if isinstance(data, dict):
            found.append((path, data))
    # Prefer the file that names the encoder by hash (the manifest's section).
    found.sort(key=lambda pd: "encoder_sha256" not in pd[1])
    return found[0] if found else None


def stage1_identity(ckpt_dir: Path, train_cfg, prefix) -> dict:
    """What `stage1.json` of the export holds: the Stage1 models and settings the latents must come from.

    Keys as in the shard manifest's stage1 section (encoder_sha256, classifier_sha256, image_size,
    trainable_blocks, pooling, latent_dim, frame, normalization), plus `source` and the checkpoint
    paths the run was given (`encoder_ckpt`, `classifier_ckpt`, for reference only).
    """
    s1 = train_cfg.stage1 if train_cfg is not None else Stage1Settings()
    recorded = {
        "encoder_sha256": None, "classifier_sha256": None, "image_size": s1.image_size,
        "trainable_blocks": prefix.tail.num_blocks if prefix.tail is not None else 0,
        "pooling": s1.latent_pooling, "latent_dim": prefix.latent_dim, "frame": s1.gif_frame,
        "normalization": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        "encoder_ckpt": s1.stage1_encoder_ckpt or None, "classifier_ckpt": s1.stage1_classifier_ckpt or None,
    }
    found = _checkpoint_stage1_file(ckpt_dir)
    if found is not None:
        path, data = found
        return {"source": f"{path.name} of the checkpoint", **data,
                **{k: v for k, v in recorded.items() if k not in data}}
    source = (f"{TRAIN_CONFIG_FILE} of the checkpoint (Stage1 hashes not recorded there)" if train_cfg is not None
              else f"defaults (the checkpoint has no {TRAIN_CONFIG_FILE})")
    return {"source": source, **recorded}


# ----------------------------------------------------------------------------------- readme
def render_readme(info: dict, stage1: dict) -> str:
    sha = stage1.get("encoder_sha256") or "not recorded"
    tail = (f"\n- `{EXPORT_PREFIX_DIR}/stage1_encoder_finetuned.safetensors`: the fine-tuned last "
            f"{stage1.get('trainable_blocks')} Stage1 encoder block(s); the prefix runs them on the tokens "
            "entering them." if info["has_stage1_tail"] else "")
    lm_what = ("the base LM with the LoRA adapter folded into its weights" if info["lora_merged"]
               else "the fine-tuned LM (the run trained the whole LM)")
    return f"""# Stage2 WeatherQA model (exported)

Exported by `python -m eval.export` from `{info['source_checkpoint']}` (base model `{info['base_model']}`),
weights in {info['dtype']}.

## Files
- `config.json`, `model.safetensors`, `generation_config.json`: {lm_what}; a standard
  Hugging Face directory (`AutoModelForCausalLM.from_pretrained(this_dir)`).
- tokenizer files: `AutoTokenizer.from_pretrained(this_dir)`.
- `{EXPORT_PREFIX_DIR}/stage2_prefix_modules.safetensors` + `{EXPORT_PREFIX_DIR}/prefix_config.json`: the image prefix
  (Stage1 latent -> {info['num_image_tokens']} LM embeddings, + 1 image-type embedding).{tail}
- `{COND_MAP_FILENAME}`: image type (cond_name) -> id of its embedding.
- `{EXPORT_STAGE1_FILE}`: the Stage1 encoder the latents must come from (encoder sha256: {sha}) and its
  settings (image size {stage1.get('image_size')}, GIF frame {stage1.get('frame')}, pooling {stage1.get('pooling')}).
- `{EXPORT_INFO_FILE}`: where this export came from; `{TRAIN_CONFIG_FILE}`: the training config (provenance).

## Use
The prefix embeddings replace {info['prefix_len']} placeholder slots right after BOS in the prompt's input
embeddings; `models/exported.py` of the stage2-weatherqa package does this (torch + transformers +
safetensors + the model library, no trainer):

```python
import json
import torch
from data_prep.images import decode_image
from models.exported import generate_from_latent, image_latent, load_exported
from models.stage1 import load_stage1_encoder
from models.tasks import build_prompt

export = "{info['export_name']}"
lm, tokenizer, prefix, cond_map = load_exported(export)
s1 = json.load(open(f"{{export}}/{EXPORT_STAGE1_FILE}"))
encoder = load_stage1_encoder("stage1_mae_encoder.pt", s1["pooling"])  # the encoder {EXPORT_STAGE1_FILE} names
pixels = torch.from_numpy(decode_image("map.gif", s1["image_size"], s1["frame"]))[None]
latent, block_tokens = image_latent(encoder, prefix, pixels)
prompt = build_prompt("summary", cond_name="shr6")  # task caption | summary | cot
print(generate_from_latent(lm, tokenizer, prefix, prompt, latent, cond_map["shr6"], block_tokens))
```
Decoding defaults are evaluation's (greedy, no_repeat_ngram_size=4, repetition_penalty=1.1,
max_new_tokens=128); pass any `generate` keyword to override them.
"""


# ----------------------------------------------------------------------------------- export
def _default_permissions(root: Path) -> None:
    """Files as the umask says (some writers create 0600 temp files): an export is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def export_checkpoint(cfg: ExportConfig) -> Path:
    """Write the export of `cfg.checkpoint_dir` to `cfg.out` (see the module docstring); returns it."""
    ckpt_dir, out = Path(cfg.checkpoint_dir), Path(cfg.out)
    keep = [ckpt_dir] + ([Path(cfg.base_model_path)] if cfg.base_model_path else [])
    check_out_dir(out, cfg.force, keep)  # before the (slow) load
    device = resolve_device(cfg.device)
    prefix_lm, tokenizer, cond_map, train_cfg = load_inference_model(
        ckpt_dir, base_model_path=cfg.base_model_path, device=device, dtype=torch.float32)
    lm = prefix_lm.lm
    lora = hasattr(lm, "peft_config")
    lora_cfg = next(iter(lm.peft_config.values())) if lora else None
    if lora:
        lm = lm.merge_and_unload()  # W + (alpha / r) * B A, in fp32
    leftover = [k for k in lm.state_dict() if "lora_" in k]
    if leftover:
        raise RuntimeError(f"LoRA weights left after merging: {leftover[:5]}")
    source_dir = Path(lm.config._name_or_path or ckpt_dir)  # the base (LoRA) or the checkpoint (whole LM)
    check_out_dir(out, cfg.force, [source_dir])
    out_dtype = stored_dtype(source_dir) if cfg.dtype == "auto" else resolve_dtype(cfg.dtype)
    lm = lm.to(out_dtype).eval()
    gen = lm.generation_config
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(gen, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(gen, name, getattr(tokenizer, name))
    prefix = prefix_lm.prefix.float()

    stage1 = stage1_identity(ckpt_dir, train_cfg, prefix)
    info = {
        "format_version": EXPORT_FORMAT_VERSION, "source_checkpoint": str(ckpt_dir.resolve()),
        "base_model": str(source_dir), "lora_merged": lora,
        "lora": ({"r": lora_cfg.r, "alpha": lora_cfg.lora_alpha, "target_modules": sorted(lora_cfg.target_modules)}
                 if lora_cfg is not None else None),
        "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[out_dtype],
        "num_image_tokens": prefix.num_image_tokens, "prefix_len": prefix.prefix_len,
        "has_stage1_tail": prefix.tail is not None,
        "train_max_seq_len": train_cfg.data.max_seq_len if train_cfg is not None else None,
        "export_name": out.name,
    }

    with atomic_dir(out) as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        prefix.save(tmp / EXPORT_PREFIX_DIR)
        atomic_write_json(tmp / COND_MAP_FILENAME, dict(cond_map))
        atomic_write_json(tmp / EXPORT_STAGE1_FILE, stage1)
        atomic_write_json(tmp / EXPORT_INFO_FILE, info)
        if (ckpt_dir / TRAIN_CONFIG_FILE).is_file():
            shutil.copyfile(ckpt_dir / TRAIN_CONFIG_FILE, tmp / TRAIN_CONFIG_FILE)
        atomic_write_text(tmp / EXPORT_README, render_readme(info, stage1))
        _default_permissions(tmp)
    return out


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> Path:
    cfg = parse_config(ExportConfig, argv)
    print_config(cfg)
    out = export_checkpoint(cfg)
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    what = "LoRA merged into the base LM" if info["lora_merged"] else "the fine-tuned LM"
    print(f"[export] {out}: {what} ({info['dtype']}), prefix of {info['prefix_len']} tokens"
          f"{' + Stage1 tail' if info['has_stage1_tail'] else ''}; see {out / EXPORT_README}")
    return out


if __name__ == "__main__":
    main()
