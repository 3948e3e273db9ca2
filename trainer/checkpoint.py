"""Checkpoints: exact-resume state for the trainer, and self-contained inference checkpoints.

Resume checkpoint (`<output_dir>/resume/`), written collectively every `--save-steps`:

    resume/step-<N>/            DeepSpeed save_checkpoint (trainable weights, ZeRO optimizer
                                partitions of every rank, LR schedule), frozen base weights excluded;
                                --engine torch: torch_engine_state.pt; --engine fsdp2: fsdp2_dcp/ (DCP,
                                sharded, reshardable to another world size) + fsdp2_engine_state.json
    resume/step-<N>/trainer_state.json   step, epoch, batches consumed in the epoch, NaN counters,
                                running truncation stats, the digest of the epoch's samples so far
                                (all ranks), the RNG states of every rank, the size of
                                every engine file; written last: it marks the checkpoint complete
    resume/latest               the tag of the newest COMPLETE checkpoint, written atomically LAST

A job killed while saving leaves `latest` pointing at the previous complete checkpoint; `--resume`
continues from it exactly (same batches, same dropout masks, same optimizer state), so N steps +
resume + M steps give the per-step losses of N + M uninterrupted steps. `latest` is a hint: when it
is missing, unreadable or names a damaged checkpoint (a file missing, unreadable or of another size
than saved), resume falls back to the newest intact one no newer than it, with a warning
(`find_resume_checkpoint`). Engine files are loaded weights-only (no pickled code runs).

Inference checkpoint (`<output_dir>/checkpoint-<step>/`, `<output_dir>/final/`): everything eval
needs next to the base model, built in a temp dir and renamed into place:

    adapter_config.json + adapter_model.safetensors   standard PEFT (PeftModel.from_pretrained)
    stage2_prefix_modules.safetensors + prefix_config.json
    stage1_encoder_finetuned.safetensors              only when Stage1 blocks were trained (K > 0)
    tokenizer files, cond_name_to_id.json, train_config.json
    stage1_identity.json      the `stage1` section of the training shards' manifest (sha256 of the
                              Stage1 encoder and classifier + the settings the latents were made
                              with): eval refuses inputs made with another Stage1

ZeRO-2 keeps the full (unpartitioned) weights on every rank, so rank 0 alone writes it. ZeRO-3 keeps
a slice of every weight per rank: `save_trained_checkpoint` (collective) gathers the LoRA + prefix
weights (small) on every rank for the write, or, for a `--no-use-lora` run, the LM one weight at a
time into rank 0's host memory (one full copy, never two). Its resume checkpoints are DeepSpeed's
per-rank partitions (`zero_pp_rank_<r>_*`); resumed on another number of ranks, they are converted
once to DeepSpeed's universal form (`resume/step-<N>/universal/`) and loaded from it.
`load_inference_model` reads it back (and the seed's older file names).
"""

from __future__ import annotations

import dataclasses
import json
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
from common.io import atomic_dir, atomic_write_json, atomic_write_text
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
from models.zero3 import any_partitioned, gathered, gathered_state_dict
from trainer.config import TrainConfig, load_train_config
from trainer.distributed import all_gather_objects, barrier, broadcast_object

RESUME_DIRNAME = "resume"
# --engine fsdp2 under resume/step-<N>/: the torch.distributed.checkpoint (DCP) directory of the
# sharded weights + optimizer (any world size reads it), and the engine's counters (rank 0)
FSDP2_DCP_DIR = "fsdp2_dcp"
FSDP2_ENGINE_STATE = "fsdp2_engine_state.json"
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
    # the epoch's samples so far, all ranks: {"epoch", "count", "digest"} (trainer/exactly_once.py)
    sample_digest: dict = field(default_factory=dict)
    world_size: int = 1
    seed: int = 0
    batch_tokens: int = 0  # the budget --batch-tokens resolved to (auto: probed once, reused on resume)


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


def resume_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / RESUME_DIRNAME


def _step_of(tag: str) -> Optional[int]:
    """N of a checkpoint tag `step-N`; None for anything else."""
    n = tag[len("step-"):]
    return int(n) if tag.startswith("step-") and n.isascii() and n.isdigit() else None


def _checkpoint_files(ckpt: Path) -> dict[str, int]:
    """{path relative to `ckpt`: bytes} of the files the engine wrote (not the marker, no temp files)."""
    return {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != STATE_FILE and not p.name.startswith(".")}


def save_resume_checkpoint(engine, output_dir: str | Path, state: TrainerState, is_main: bool,
                           keep: int = 2) -> Path:
    """Collective. A checkpoint is complete once its trainer_state.json exists: rank 0 writes it
    (atomically) after every rank's engine files are on disk, with the size of each of them, so that
    a file truncated or lost later is found before anything is loaded. The order: the marker of an
    earlier save of the same step is removed first (a resumed run saves that step again), then the
    engine state (every rank), trainer_state.json, the `latest` pointer, pruning."""
    root = resume_dir(output_dir)
    tag = f"step-{state.step}"
    if is_main:
        (root / tag / STATE_FILE).unlink(missing_ok=True)
    barrier()  # no rank rewrites a file of a checkpoint that still looks complete
    engine.save(root, tag, client_state={"trainer_state": dataclasses.asdict(state)})
    rngs = all_gather_objects(rng_state())
    barrier()  # every rank's engine files are on disk
    if is_main:
        record = {**dataclasses.asdict(state), "rng": rngs, "files": _checkpoint_files(root / tag)}
        atomic_write_json(root / tag / STATE_FILE, record)  # the completeness marker
        atomic_write_text(root / LATEST_FILE, tag + "\n")  # the commit point
        _prune(root, keep)
    barrier()
    return root / tag


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and incomplete ones (saves that
    never finished: unusable, and they would otherwise count against `keep`)."""
    steps = [(n, p) for p in root.glob("step-*") if p.is_dir() and (n := _step_of(p.name)) is not None]
    kept = set(sorted(n for n, p in steps if (p / STATE_FILE).is_file())[-keep:])
    for n, p in steps:
        if n not in kept:
            shutil.rmtree(p, ignore_errors=True)


def check_resume_checkpoint(ckpt: Path) -> tuple[Optional[dict], str]:
    """(its trainer_state.json, "") when checkpoint `ckpt` is complete and its files are intact as
    far as a cheap look tells (present, readable, the sizes recorded when it was saved), else
    (None, what is wrong, naming the file)."""
    marker = ckpt / STATE_FILE
    if not marker.is_file():
        return None, f"{ckpt}: incomplete ({STATE_FILE} missing: a save that did not finish)"
    try:
        saved = json.loads(marker.read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{marker}: unreadable ({type(e).__name__}: {e})"
    ints = [f.name for f in dataclasses.fields(TrainerState) if f.type == "int"]
    if (not isinstance(saved, dict) or not isinstance(saved.get("rng"), list)
            or any(type(saved.get(k, 0)) is not int for k in ints) or saved.get("step") != _step_of(ckpt.name)):
        return None, f"{marker}: not a trainer state of {ckpt.name} (damaged?)"
    files = saved.get("files", {})  # absent in checkpoints written before sizes were recorded
    if not isinstance(files, dict):
        return None, f"{marker}: not a trainer state of {ckpt.name} (damaged?)"
    for rel, size in files.items():
        path = ckpt / rel
        try:
            actual = path.stat().st_size
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            return None, f"{path}: missing"
        except OSError as e:
            return None, f"{path}: unreadable ({type(e).__name__}: {e})"
        if actual != size:
            return None, f"{path}: {actual} bytes, {size} when it was saved (truncated or overwritten?)"
    return saved, ""


def find_resume_checkpoint(output_dir: str | Path) -> tuple[Optional[str], Optional[dict], list[str]]:
    """(tag, its trainer_state.json, what was wrong with the checkpoints passed over) for --resume.
    A function of the files only.

    `resume/latest` is a hint: the checkpoint it names when that is complete and intact, else the
    newest complete and intact `step-*` no newer than it (newer ones were never committed, or are
    left from before a rewind of `latest`); without a readable `latest`, the newest of all.
    (None, None, problems) when nothing was ever committed there; a CheckpointError naming every
    file that is wrong when checkpoints were committed but none is usable.
    """
    root = resume_dir(output_dir)
    pointer = root / LATEST_FILE
    steps = {}
    if root.is_dir():
        steps = {n: p.name for p in root.iterdir() if p.is_dir() and (n := _step_of(p.name)) is not None}
    problems, bound = [], None
    if pointer.is_file():
        try:
            named = pointer.read_bytes().decode("utf-8").strip()
            bound = _step_of(named)
            if bound is None:
                problems.append(f"{pointer}: {named[:40]!r} is not a checkpoint tag (damaged?)")
            elif bound not in steps:
                problems.append(f"{pointer}: names {named}, which does not exist")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{pointer}: unreadable ({type(e).__name__}: {e})")
    for n in sorted((n for n in steps if bound is None or n <= bound), reverse=True):
        saved, problem = check_resume_checkpoint(root / steps[n])
        if saved is not None:
            return steps[n], saved, problems
        problems.append(problem)
    if pointer.exists() or any((root / tag / STATE_FILE).exists() for tag in steps.values()):
        raise CheckpointError(f"{root}: no usable resume checkpoint: " + "; ".join(problems)
                              + ". Repair or remove them, or start over without --resume")
    return None, None, problems


def resumed_batch_tokens(output_dir: str | Path, rank: int) -> Optional[int]:
    """Collective. The token budget the checkpoint --resume will continue from recorded (None when
    there is none, or it predates the record): a run keeps its data plan on another GPU."""
    saved = None
    if rank == 0:
        try:
            saved = find_resume_checkpoint(output_dir)[1]
        except CheckpointError:
            saved = None  # load_resume_checkpoint reports it
    value = broadcast_object((saved or {}).get("batch_tokens"))
    return int(value) if value else None


def latest_resume_tag(output_dir: str | Path) -> Optional[str]:
    """The tag --resume continues from (find_resume_checkpoint), or None when there is none."""
    return find_resume_checkpoint(output_dir)[0]


def load_resume_checkpoint(engine, output_dir: str | Path, rank: int, world_size: int,
                           warn=None) -> Optional[TrainerState]:
    """Collective. Rank 0 picks the checkpoint (find_resume_checkpoint) and every rank gets its
    choice; `warn(message)` (rank 0) hears what was wrong with the ones passed over. Then the engine
    state and this rank's RNG are restored. None when there is nothing to resume; errors name the file.

    A file found bad only while the engine loads it (e.g. refused by the weights-only load) is an
    error, not a fall-back: the engine may have loaded part of it, and the ranks would disagree."""
    root = resume_dir(output_dir)
    choice = None
    if rank == 0:
        try:
            choice = find_resume_checkpoint(output_dir)
        except CheckpointError as e:
            choice = str(e)
    choice = broadcast_object(choice)
    if isinstance(choice, str):
        raise CheckpointError(choice)
    tag, saved, problems = choice
    if rank == 0 and warn is not None:
        for problem in problems:
            warn(f"--resume: {problem}; passed over")
        if problems and tag is not None:
            warn(f"--resume: continuing from {root / tag}")
    if tag is None:
        return None
    marker = root / tag / STATE_FILE
    rngs = saved.pop("rng")
    known = {f.name for f in dataclasses.fields(TrainerState)}
    state = TrainerState(**{k: v for k, v in saved.items() if k in known})
    if len(rngs) != state.world_size:
        raise CheckpointError(f"{marker}: RNG states of {len(rngs)} ranks for {state.world_size} (damaged?)")
    resharded = state.world_size != world_size
    if resharded and not getattr(engine, "reshardable", False):
        raise CheckpointError(
            f"{root / tag}: saved with {state.world_size} ranks, resuming with {world_size}; exact resume "
            "needs the same world size (ZeRO partitions and the data split depend on it); --engine fsdp2 and "
            "ZeRO-3 (--deepspeed ds_configs/zero3.json) checkpoints resume on another world size")
    try:
        if resharded and hasattr(engine, "load_resharded"):  # ZeRO-3: through a universal checkpoint
            engine.load_resharded(root, tag, state.world_size)
        else:  # FSDP2's DCP load reshards by itself
            engine.load(root, tag)
    except Exception as e:
        raise CheckpointError(f"{root / tag}: cannot restore the engine state: {e}") from e
    if resharded:
        state = rescale_data_position(state, world_size, warn if rank == 0 else None)
    try:
        set_rng_state(rngs[rank % len(rngs)])
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{marker}: bad RNG state of rank {rank} ({type(e).__name__}: {e})") from None
    return state


def rescale_data_position(state: TrainerState, world_size: int, warn=None) -> TrainerState:
    """The trainer state of a checkpoint written on `state.world_size` ranks, for `world_size` ranks.

    Weights, optimizer state and the count of applied steps reshard exactly (FSDP2 + DCP, ZeRO-3 via
    DeepSpeed's universal checkpoint); the data
    position cannot: each rank read a contiguous share of the epoch, and other shares start
    elsewhere. The run continues at the same FRACTION of the epoch (batches consumed x old / new
    ranks, per-rank batch size unchanged), so some samples of the epoch may be seen twice or not
    at all; from the next epoch on the order is again exact."""
    batches = (state.batches_in_epoch * state.world_size) // world_size
    if warn is not None:
        warn(f"--resume: checkpoint written on {state.world_size} ranks, resuming on {world_size}: weights and "
             f"optimizer state are resharded exactly; epoch {state.epoch} continues at batch {batches} "
             f"(was {state.batches_in_epoch} on {state.world_size} ranks), its remaining samples approximate")
    return dataclasses.replace(state, batches_in_epoch=batches, world_size=world_size)


# --------------------------------------------------------------------------------------------
# Inference checkpoints
# --------------------------------------------------------------------------------------------

def save_trained_checkpoint(model, tokenizer, cond_map: dict, train_config, out_dir: str | Path, is_main: bool,
                            stage1: Optional[Stage1Record | dict] = None) -> None:
    """Collective: `save_inference_checkpoint` of a model being trained, written by rank 0 (`is_main`).
    With ZeRO-3 partitioned weights, every rank takes part in gathering them (module doc)."""
    if not any_partitioned(model):
        if is_main:
            save_inference_checkpoint(model, tokenizer, cond_map, train_config, out_dir, stage1=stage1)
        return
    lm_state = None
    if hasattr(model.lm, "peft_config"):  # the adapter: the trained LoRA weights, with the prefix below
        small = [p for n, p in model.lm.named_parameters() if p.requires_grad or "lora_" in n]
    else:  # the whole LM: one weight gathered at a time
        lm_state = gathered_state_dict(model.lm, keep=is_main)
        small = []
    with gathered(small + list(model.prefix.parameters())):
        if is_main:
            save_inference_checkpoint(model, tokenizer, cond_map, train_config, out_dir, stage1=stage1,
                                      state_dict={f"lm.{k}": v for k, v in (lm_state or {}).items()} or None)


def save_inference_checkpoint(model, tokenizer, cond_map: dict, train_config, out_dir: str | Path,
                              stage1: Optional[Stage1Record | dict] = None, state_dict: Optional[dict] = None) -> Path:
    """Write the adapter, prefix (+ tail), tokenizer, cond map and config into `out_dir` atomically.

    `stage1` is the Stage1 identity of the training data (the shards' manifest `stage1` section:
    checkpoint hashes and settings), written to STAGE1_IDENTITY_FILE; the trainer always gives it.
    With LoRA the LM part is the PEFT adapter; a run with `--no-use-lora` trained the whole LM, so
    its checkpoint holds the whole LM instead (Hugging Face format: `config.json` + safetensors).
    Call on rank 0 only (ZeRO-2 holds full weights everywhere; ZeRO-3: `save_trained_checkpoint`).
    An existing `out_dir` is replaced. `state_dict`: full weights to write instead of reading the
    model's (keys `lm.*`, `prefix.*`; either part may be absent, the LoRA run's trainable ones
    suffice) when the model itself holds only shards (--engine fsdp2: `engine.gathered_state_dict()`;
    ZeRO-3 full fine-tuning: the LM gathered one weight at a time).
    """
    out_dir = Path(out_dir)
    lm_sd = prefix_sd = None
    if state_dict is not None:
        lm_sd = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")} or None
        prefix_sd = {k[len("prefix."):]: v for k, v in state_dict.items() if k.startswith("prefix.")} or None
    with atomic_dir(out_dir) as tmp:
        if hasattr(model.lm, "peft_config"):
            save_adapter(model, tmp, lm_state_dict=lm_sd)
        else:
            model.lm.save_pretrained(str(tmp), safe_serialization=True, state_dict=lm_sd)
        model.prefix.save(tmp, state_dict=prefix_sd)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / COND_MAP_FILENAME, dict(cond_map))
        cfg_dict = config_to_dict(train_config) if dataclasses.is_dataclass(train_config) else dict(train_config)
        atomic_write_json(tmp / TRAIN_CONFIG_FILE, cfg_dict)
        if stage1 is not None:
            atomic_write_json(tmp / STAGE1_IDENTITY_FILE,
                              dataclasses.asdict(stage1) if dataclasses.is_dataclass(stage1) else dict(stage1))
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
