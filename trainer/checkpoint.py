"""Checkpoints: exact-resume state for the trainer, and self-contained inference checkpoints.

Resume checkpoint (`<output_dir>/resume/`), written collectively every `--save-steps`:

    resume/step-<N>/            DeepSpeed save_checkpoint (trainable weights, ZeRO optimizer
                                partitions of every rank, LR schedule), frozen base weights excluded
    resume/step-<N>/trainer_state.json   step, epoch, batches consumed in the epoch, NaN counters,
                                running truncation stats, the RNG states of every rank
    resume/latest               the tag of the newest COMPLETE checkpoint, written atomically LAST

A job killed while saving leaves `latest` pointing at the previous complete checkpoint; `--resume`
continues from it exactly (same batches, same dropout masks, same optimizer state), so N steps +
resume + M steps give the per-step losses of N + M uninterrupted steps.

Inference checkpoint (`<output_dir>/checkpoint-<step>/`, `<output_dir>/final/`): everything eval
needs next to the base model, built in a temp dir and renamed into place:

    adapter_config.json + adapter_model.safetensors   standard PEFT (PeftModel.from_pretrained)
    stage2_prefix_modules.safetensors + prefix_config.json
    stage1_encoder_finetuned.safetensors              only when Stage1 blocks were trained (K > 0)
    tokenizer files, cond_name_to_id.json, train_config.json
    stage1_identity.json      the `stage1` section of the training shards' manifest (sha256 of the
                              Stage1 encoder and classifier + the settings the latents were made
                              with): eval refuses inputs made with another Stage1

ZeRO-2 keeps the full (unpartitioned) weights on every rank, so rank 0 alone writes it.
`load_inference_model` reads it back (and the seed's older file names).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig

from common.config import config_to_dict
from common.io import atomic_write_json, atomic_write_text
from data_prep.manifest import Stage1Record
from models.cond_names import COND_MAP_FILENAME
from models.prefix_lm import (
    ADAPTER_CONFIG,
    PREFIX_WEIGHTS,
    SEED_PREFIX_WEIGHTS,
    ModelConfig,
    Stage2Prefix,
    build_prefix_lm,
    load_adapter_into,
    load_tokenizer,
    save_adapter,
)
from trainer.config import TrainConfig, load_train_config

RESUME_DIRNAME = "resume"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
# Inference-checkpoint files. The model library names the files its modules write (adapter config
# and prefix: models.prefix_lm; Stage1 tail: models.stage1; cond map: models.cond_names); these are the rest.
TRAIN_CONFIG_FILE = "train_config.json"
STAGE1_IDENTITY_FILE = "stage1_identity.json"  # the training shards' manifest `stage1` section
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # ours, then the seed's


class CheckpointError(ValueError):
    """A checkpoint is missing a file or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------------
# Resume checkpoints
# --------------------------------------------------------------------------------------------

@dataclass
class TrainerState:
    """Where training stands; everything the loop needs besides DeepSpeed's own state."""

    step: int = 0  # optimizer steps done (applied or skipped as non-finite)
    epoch: int = 0  # the epoch in progress (0-based)
    batches_in_epoch: int = 0  # micro-batches of `epoch` consumed on every rank
    consecutive_nan: int = 0
    nan_steps_total: int = 0
    tokens_seen: int = 0  # real (non-pad) tokens over all ranks
    truncation: dict = field(default_factory=dict)  # running TruncationStats.as_dict(), all ranks
    world_size: int = 1
    seed: int = 0


def rng_state() -> dict:
    """This process's RNG states as JSON-able data."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _gather_objects(obj) -> list:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def resume_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / RESUME_DIRNAME


def save_resume_checkpoint(engine, output_dir: str | Path, state: TrainerState, is_main: bool,
                           keep: int = 2) -> Path:
    """Collective. DeepSpeed state, then trainer_state.json, then the `latest` pointer, then pruning."""
    root = resume_dir(output_dir)
    tag = f"step-{state.step}"
    engine.save(root, tag, client_state={"trainer_state": dataclasses.asdict(state)})
    rngs = _gather_objects(rng_state())
    _barrier()  # every rank's DeepSpeed files are on disk
    if is_main:
        atomic_write_json(root / tag / STATE_FILE, {**dataclasses.asdict(state), "rng": rngs})
        atomic_write_text(root / LATEST_FILE, tag + "\n")  # the commit point
        _prune(root, keep)
    _barrier()
    return root / tag


def _prune(root: Path, keep: int) -> None:
    tags = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_resume_tag(output_dir: str | Path) -> Optional[str]:
    """The tag named by `resume/latest`, if it points at a complete checkpoint."""
    root = resume_dir(output_dir)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (root / tag / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {tag!r} but {root / tag / STATE_FILE} is missing")
    return tag


def load_resume_checkpoint(engine, output_dir: str | Path, rank: int, world_size: int) -> Optional[TrainerState]:
    """Collective. Restores DeepSpeed state and this rank's RNG; None when there is nothing to resume."""
    tag = latest_resume_tag(output_dir)
    if tag is None:
        return None
    root = resume_dir(output_dir)
    saved = json.loads((root / tag / STATE_FILE).read_text())
    rngs = saved.pop("rng")
    known = {f.name for f in dataclasses.fields(TrainerState)}
    state = TrainerState(**{k: v for k, v in saved.items() if k in known})
    if state.world_size != world_size:
        raise CheckpointError(
            f"{root / tag}: saved with {state.world_size} ranks, resuming with {world_size}; exact resume "
            "needs the same world size (ZeRO partitions and the data split depend on it)")
    engine.load(root, tag)
    set_rng_state(rngs[rank])
    return state


# --------------------------------------------------------------------------------------------
# Inference checkpoints
# --------------------------------------------------------------------------------------------

def save_inference_checkpoint(model, tokenizer, cond_map: dict, train_config, out_dir: str | Path,
                              stage1: Optional[Stage1Record | dict] = None) -> Path:
    """Write the adapter, prefix (+ tail), tokenizer, cond map and config into `out_dir` atomically.

    `stage1` is the Stage1 identity of the training data (the shards' manifest `stage1` section:
    checkpoint hashes and settings), written to STAGE1_IDENTITY_FILE; the trainer always gives it.
    With LoRA the LM part is the PEFT adapter; a run with `--no-use-lora` trained the whole LM, so
    its checkpoint holds the whole LM instead (Hugging Face format: `config.json` + safetensors).
    Call on rank 0 only (ZeRO-2 holds full weights everywhere). An existing `out_dir` is replaced.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if hasattr(model.lm, "peft_config"):
            save_adapter(model, tmp)
        else:
            model.lm.save_pretrained(str(tmp), safe_serialization=True)
        model.prefix.save(tmp)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / COND_MAP_FILENAME, dict(cond_map))
        cfg_dict = config_to_dict(train_config) if dataclasses.is_dataclass(train_config) else dict(train_config)
        atomic_write_json(tmp / TRAIN_CONFIG_FILE, cfg_dict)
        if stage1 is not None:
            atomic_write_json(tmp / STAGE1_IDENTITY_FILE,
                              dataclasses.asdict(stage1) if dataclasses.is_dataclass(stage1) else dict(stage1))
        if out_dir.exists():  # e.g. `final/` of an earlier, resumed run
            old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_stage1_identity(ckpt_dir: str | Path) -> Optional[Stage1Record]:
    """The Stage1 identity the checkpoint was trained with (STAGE1_IDENTITY_FILE), or None for
    checkpoints written before it existed (and the seed's)."""
    path = Path(ckpt_dir) / STAGE1_IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    names = [f.name for f in dataclasses.fields(Stage1Record)]
    required = [f.name for f in dataclasses.fields(Stage1Record) if f.default is dataclasses.MISSING]
    missing = [k for k in required if not isinstance(d, dict) or k not in d]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing} (expected a shard manifest's stage1 section)")
    for key in ("encoder_sha256", "classifier_sha256"):
        if not isinstance(d[key], str):
            raise CheckpointError(f"{path}: field {key!r} must be a string, got {d[key]!r}")
    return Stage1Record(**{k: d[k] for k in names if k in d})


def _first_existing(ckpt_dir: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (ckpt_dir / n).is_file():
            return ckpt_dir / n
    raise CheckpointError(f"{ckpt_dir}: missing {what} (expected one of {', '.join(names)})")


def _adapter_in_features(ckpt_dir: Path) -> dict[str, int]:
    """{target module name: input features} of the saved LoRA A matrices (safetensors only)."""
    weights = ckpt_dir / ADAPTER_WEIGHTS[0]
    if not weights.is_file():
        return {}
    out = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0].rsplit(".", 1)[-1]
                out.setdefault(module, f.get_slice(key).get_shape()[1])
    return out


def _check_adapter_fits(ckpt_dir: Path, adapter_cfg: dict, base: str, base_config) -> None:
    """An adapter trained on another base model is a clear error, not a shape mismatch deep in PEFT."""
    hidden = getattr(base_config, "hidden_size", None)
    for module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # these read the hidden state
        n = _adapter_in_features(ckpt_dir).get(module)
        if n is not None and hidden is not None and n != hidden:
            raise CheckpointError(
                f"{ckpt_dir}: the adapter was trained on a base model with hidden size {n} "
                f"(base_model_name_or_path={adapter_cfg.get('base_model_name_or_path')!r}), "
                f"but {base} has hidden size {hidden}")


def load_inference_model(ckpt_dir: str | Path, base_model_path: Optional[str] = None, device: str = "cpu",
                         dtype: Optional[torch.dtype] = None):
    """(PrefixLM in eval mode, tokenizer, cond_name_to_id, TrainConfig or None) from an inference checkpoint.

    The model is built like in training (`build_prefix_lm`: same attention backend and loss
    kernels), then the saved adapter, prefix and Stage1 tail are loaded into it. A `--no-use-lora`
    run's checkpoint holds the whole fine-tuned LM instead of an adapter, and is loaded as the LM.
    `base_model_path` defaults to the model path recorded at training time. Also reads the seed's
    `adapter_model.bin` / `stage2_prefix_modules.pt` (no train_config.json needed).

    The training config comes back typed, or None when the checkpoint has no train_config.json (the
    seed's); fields TrainConfig does not have (e.g. from another trainer version) are ignored. The
    Stage1 identity is read by `load_stage1_identity` (checked here only for being readable).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    full_lm = not (ckpt_dir / ADAPTER_CONFIG).is_file() and (ckpt_dir / "config.json").is_file()
    if not full_lm:
        adapter_cfg_path = _first_existing(ckpt_dir, (ADAPTER_CONFIG,), "the PEFT adapter config")
        _first_existing(ckpt_dir, ADAPTER_WEIGHTS, "the LoRA adapter weights")
    _first_existing(ckpt_dir, (PREFIX_WEIGHTS, SEED_PREFIX_WEIGHTS), "the Stage2 prefix weights")
    cond_map_path = _first_existing(ckpt_dir, (COND_MAP_FILENAME,), "the cond_name -> id map")
    load_stage1_identity(ckpt_dir)  # a damaged identity file fails here, before the model is built
    train_cfg: Optional[TrainConfig] = None
    if (ckpt_dir / TRAIN_CONFIG_FILE).is_file():
        train_cfg = load_train_config(ckpt_dir / TRAIN_CONFIG_FILE, ignore_unknown=True)
    mcfg = train_cfg.model if train_cfg is not None else ModelConfig()
    precision = {None: mcfg.precision, torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, mcfg.precision)
    prefix = Stage2Prefix.load(ckpt_dir, map_location="cpu")

    if full_lm:  # a --no-use-lora run: the checkpoint is itself the (whole, fine-tuned) LM
        _first_existing(ckpt_dir, ("model.safetensors", "model.safetensors.index.json"), "the fine-tuned LM weights")
        mcfg = dataclasses.replace(mcfg, model_path=str(ckpt_dir), use_lora=False, precision=precision,
                                   gradient_checkpointing=False)
    else:
        adapter_cfg = json.loads(adapter_cfg_path.read_text())
        base = base_model_path or mcfg.model_path or adapter_cfg.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise CheckpointError(f"{ckpt_dir}: base model {base!r} is not a local directory; pass base_model_path")
        _check_adapter_fits(ckpt_dir, adapter_cfg, base, AutoConfig.from_pretrained(base))
        # The LoRA shape comes from the adapter itself (authoritative, also for seed checkpoints).
        targets = adapter_cfg.get("target_modules") or mcfg.lora_target_modules
        mcfg = dataclasses.replace(
            mcfg, model_path=str(base), use_lora=True, lora_r=int(adapter_cfg.get("r", mcfg.lora_r)),
            lora_alpha=int(adapter_cfg.get("lora_alpha", mcfg.lora_alpha)),
            lora_target_modules=sorted(targets) if isinstance(targets, (list, set, tuple)) else [targets],
            precision=precision, gradient_checkpointing=False)
    model, tokenizer = build_prefix_lm(mcfg, latent_dim=prefix.latent_dim, num_classes=prefix.num_classes,
                                       device=torch.device(device))
    if not full_lm:
        try:
            load_adapter_into(model, ckpt_dir)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt_dir}: the adapter does not fit base model {mcfg.model_path}: {e}") from e
    model.prefix = prefix.to(device=device, dtype=next(model.lm.parameters()).dtype)
    if (ckpt_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(ckpt_dir)
    cond_map = json.loads(cond_map_path.read_text())
    return model.eval(), tokenizer, cond_map, train_cfg
