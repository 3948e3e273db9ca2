"""`--engine deepspeed`: DeepSpeed ZeRO (stage 1, 2 or 3) from a ds_configs/ JSON, the spec's default.

What `build_ds_config` decides so that the JSON can say "auto":
- `train_micro_batch_size_per_gpu` = 1: one micro-batch is ONE packed row holding the batch's
  examples (models/collate.py), so DeepSpeed's notion of a "sample" is a packed row.
- AdamW: PyTorch's implementation (`torch_adam`), so no DeepSpeed op is JIT-built, and its fused
  kernel (one launch over the fp32 partition).
- The warm-up + cosine schedule is a torch `LambdaLR` handed to `deepspeed.initialize`, so its
  state is in DeepSpeed's checkpoints (exact resume); DeepSpeed does not step it on a skipped update.
- `bf16.enabled` from `--precision` (auto: bf16 on CUDA, fp32 on CPU), clipping from `--max-grad-norm`.
- ZeRO-3 only: the bucket sizes left "auto" scale with the LM's hidden size H (DeepSpeed's and HF's
  rule: reduce bucket H², prefetch bucket 0.9·H², parameters under 10·H elements stay gathered).
ZeRO checks the gradient norm before every update and, when it is inf/NaN, zeroes the gradients and
skips the update and the LR step (on all ranks alike, since the check is all-reduced; ZeRO-3 too).

ZeRO-3 (ds_configs/zero3.json, zero3_offload.json) also partitions the weights themselves:
- the model is built inside `zero3_model_init` (transformers' from_pretrained then creates it under
  deepspeed.zero.Init and loads each weight straight into its partitions: no rank holds the whole LM);
- weights the model reads outside their own module's forward are declared (models/zero3.py);
- the flat LoRA tensor is not used (trainer/engines/__init__.py says why);
- resume checkpoints are DeepSpeed's partitioned ones; the inference checkpoint is gathered
  (trainer/checkpoint.py).

Resume loads DeepSpeed's checkpoint files weights-only: DeepSpeed's own checkpoint engine calls
`torch.load(..., weights_only=False)`, which runs whatever code a planted file carries; the engine's
`checkpoint_engine` is replaced by `WeightsOnlyLoads`, which keeps its saving and loads with
`weights_only=True`, allowing only the few DeepSpeed classes its ZeRO-1/2 checkpoints hold.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from common.io import atomic_dir
from models.zero3 import is_partitioned, register_weight_reads
from trainer.config import TrainConfig, resolve_ds_config_path
from trainer.distributed import barrier, broadcast_object
from trainer.engines.base import Engine
from trainer.engines.optim import optimizer_groups, warmup_cosine


def _fill(section: dict, key: str, value: Any) -> None:
    """Set `key` when it is missing or "auto"; an explicit value in the JSON wins."""
    if section.get(key, "auto") == "auto":
        section[key] = value


def build_ds_config(cfg: TrainConfig, precision: str, hidden_size: Optional[int] = None) -> dict:
    """The DeepSpeed config dict: the JSON file with its "auto" fields filled from `cfg`."""
    path = resolve_ds_config_path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--deepspeed {path}: cannot read the DeepSpeed config ({e})") from e
    ds = copy.deepcopy(ds)
    o = cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", 1)  # one packed row of --batch-size examples
    _fill(ds, "gradient_accumulation_steps", o.gradient_accumulation_steps)
    _fill(ds, "gradient_clipping", o.max_grad_norm)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", precision == "bf16")
    if precision == "bf16" and bf16["enabled"] is not True:
        raise ValueError(f"{path}: bf16.enabled is false but --precision resolved to bf16")
    ds.pop("fp16", None)  # fp16 loss scaling is not supported here: bf16 or fp32
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", o.lr)
    _fill(params, "betas", [o.adam_beta1, o.adam_beta2])
    _fill(params, "eps", o.adam_eps)
    _fill(params, "weight_decay", o.weight_decay)
    params.setdefault("torch_adam", True)
    # PyTorch's fused AdamW: one kernel over the fp32 partition instead of foreach's several (DeepSpeed
    # passes params it does not know through to torch.optim.AdamW); the torch engine uses it too.
    params.setdefault("fused", True)
    ds.pop("scheduler", None)  # ours is passed to deepspeed.initialize (exact-resumable LambdaLR)
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage}); "
                         "the non-finite-step skip relies on ZeRO's gradient-norm check")
    if stage == 3:
        _fill_stage3_sizes(zero, hidden_size, path, cfg)
    return ds


STAGE3_AUTO_SIZES = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _fill_stage3_sizes(zero: dict, hidden_size: Optional[int], path: Path, cfg: TrainConfig) -> None:
    """ZeRO-3's bucket sizes left "auto", from the LM's hidden size (module doc)."""
    if not any(zero.get(k) == "auto" for k in STAGE3_AUTO_SIZES):
        return
    if hidden_size is None:
        from transformers import AutoConfig

        try:
            hidden_size = int(AutoConfig.from_pretrained(cfg.model.model_path).hidden_size)
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: its ZeRO-3 bucket sizes are 'auto', which needs the hidden size from "
                             f"--model-path {cfg.model.model_path!r}/config.json ({e})") from e
    h2 = hidden_size * hidden_size
    for key, value in zip(STAGE3_AUTO_SIZES, (h2, int(0.9 * h2), 10 * hidden_size)):
        _fill(zero, key, value)


def zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage of `--deepspeed` (0 for `--engine torch`); config errors are build_ds_config's."""
    if getattr(cfg, "engine", "deepspeed") != "deepspeed":
        return 0
    try:
        return int(json.loads(resolve_ds_config_path(cfg.deepspeed).read_text())
                   .get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


@contextlib.contextmanager
def zero3_model_init(cfg: TrainConfig, precision: str):
    """Build the model inside this block: with a ZeRO-3 `--deepspeed` config, transformers'
    `from_pretrained` creates the LM under deepspeed.zero.Init and loads every weight straight into
    its partitions (it asks `is_deepspeed_zero3_enabled()`, true while an HfDeepSpeedConfig lives), so
    no rank ever holds the whole LM; modules built outside (LoRA, the prefix) are partitioned by
    `deepspeed.initialize`. A no-op for other engines and stages."""
    if zero_stage(cfg) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(build_ds_config(cfg, precision))  # transformers holds a weak reference
    try:
        yield
    finally:
        # Afterwards transformers must not think ZeRO-3 is on (save_pretrained, generate would change)
        unset_hf_deepspeed_config()
        del keep_alive


class CheckpointFileError(RuntimeError):
    """A checkpoint file cannot be loaded (refused as unsafe, truncated, unreadable); names the file."""


def ds_checkpoint_safe_globals() -> list:
    """The classes besides tensors and plain containers that DeepSpeed's ZeRO-1/2 checkpoints hold
    (its optimizer-state files: the loss scaler, the ZeRO stage enum, fragment addresses), found by
    loading real checkpoints weights-only (fp32, bf16, CPU offload); tests/test_engine.py keeps this honest."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_refusal(e: BaseException) -> Optional[str]:
    """The point of torch.load's message when a weights-only load refused a file, else None."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    detail = text[text.find("WeightsUnpickler error:"):].split("Check the documentation")[0].split(". Please use")[0]
    return " ".join(detail.split())


def load_weights_only(path: str, map_location=None):
    """torch.load(path, weights_only=True) allowing ds_checkpoint_safe_globals(); errors name the file."""
    try:
        with torch.serialization.safe_globals(ds_checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip archive), OSError, ...
        refusal = weights_only_refusal(e)
        if refusal is not None:
            raise CheckpointFileError(
                f"{path}: refused: it holds objects other than tensors, plain containers and DeepSpeed's own "
                f"checkpoint classes, and loading them could run code the file carries (not written by this "
                f"trainer? replaced?) [{refusal}]") from None
        raise CheckpointFileError(f"{path}: cannot load (truncated or corrupt?): {type(e).__name__}: {e}") from e


class WeightsOnlyLoads:
    """DeepSpeed's configured checkpoint engine with a weights-only `load`; everything else (saving,
    commit, the writer layout) is the engine's own."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):  # only for what this class does not define
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)


@contextlib.contextmanager
def weights_only_torch_loads():
    """Every `torch.load` inside the block is weights-only (allowing ds_checkpoint_safe_globals()): for
    DeepSpeed code that loads checkpoint files itself with `weights_only=False` (the universal-checkpoint
    converter and loader), not through the engine's checkpoint_engine."""
    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(ds_checkpoint_safe_globals()):
                return real(f, *args, **kwargs)
        except Exception as e:
            refusal = weights_only_refusal(e)
            if refusal is not None:
                raise CheckpointFileError(f"{f}: refused: it holds objects other than tensors, plain containers "
                                          f"and DeepSpeed's own checkpoint classes [{refusal}]") from None
            raise

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


UNIVERSAL_DIRNAME = "universal"  # inside a resume checkpoint: its DeepSpeed universal form, made on demand


def convert_to_universal(ckpt_dir: Path) -> Path:
    """`ckpt_dir/universal/`: DeepSpeed's universal checkpoint of the ZeRO checkpoint in `ckpt_dir`
    (every parameter's fp32 weight and Adam moments, whole, one folder each: loadable on any number of
    ranks). Made once (atomically) and reused; call on one rank."""
    from deepspeed.checkpoint import ds_to_universal

    out = ckpt_dir / UNIVERSAL_DIRNAME
    if (out / "zero").is_dir():
        return out
    with atomic_dir(out) as tmp, weights_only_torch_loads():
        args = argparse.Namespace(input_folder=str(ckpt_dir), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        ds_to_universal.main(args)
    return out


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine seen through the methods the training loop needs."""

    def __init__(self, ds_engine, device: torch.device, dtype: torch.dtype):
        self.ds = ds_engine
        self.device = device
        self.dtype = dtype
        if getattr(ds_engine, "checkpoint_engine", None) is not None and not isinstance(
                ds_engine.checkpoint_engine, WeightsOnlyLoads):
            ds_engine.checkpoint_engine = WeightsOnlyLoads(ds_engine.checkpoint_engine)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def partitions_weights(self) -> bool:
        """ZeRO-3: every forward and any weight read is collective (all ranks take part)."""
        return bool(self.ds.zero_optimization_partition_weights())

    @property
    def reshardable(self) -> bool:
        """ZeRO-3 resumes on another world size (load_resharded, a universal checkpoint)."""
        return self.partitions_weights

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def forward(self, batch: dict):
        return self.ds(self.to_device(batch))

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # divides the loss by gradient_accumulation_steps

    def is_boundary(self) -> bool:
        """True when the next `step()` applies an update (end of gradient accumulation)."""
        return self.ds.is_gradient_accumulation_boundary()

    def step(self) -> bool:
        """Optimizer + LR step at an accumulation boundary. False when ZeRO skipped a non-finite update."""
        boundary = self.is_boundary()
        self.ds.step()
        return (not boundary) or bool(getattr(self.ds, "_step_applied", True))

    @property
    def skipped_steps(self) -> int:
        return int(self.ds.skipped_steps)

    def lr(self) -> dict[str, float]:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.ds.optimizer.param_groups)}

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, save_dir: str | Path, tag: str, client_state: dict | None = None) -> None:
        """Collective: every rank writes its optimizer partition. Frozen base weights are not saved."""
        # An earlier save of this tag (a resumed run saves its step again, maybe on another number of
        # ranks) is incomplete by now (trainer/checkpoint.py removed its marker): its per-rank files and
        # universal form must not mix with the new ones.
        if self.ds.global_rank == 0:
            shutil.rmtree(Path(save_dir) / tag, ignore_errors=True)
        barrier()
        self.ds.save_checkpoint(str(save_dir), tag=tag, client_state=client_state or {},
                                save_latest=False, exclude_frozen_parameters=True)

    def load(self, load_dir: str | Path, tag: str) -> dict:
        """Collective: restores trainable weights, optimizer, LR schedule; returns the client state."""
        path, client_state = self.ds.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed checkpoint {Path(load_dir) / tag} could not be loaded "
                                    f"(written by --engine torch? then resume with --engine torch)")
        return client_state or {}

    def load_resharded(self, load_dir: str | Path, tag: str, saved_world_size: int) -> dict:
        """Collective: `load` of a checkpoint written on another number of ranks (ZeRO-3 only), through
        DeepSpeed's universal checkpoint: rank 0 converts it once (`convert_to_universal`), every rank
        then loads its new partition of each weight and Adam moment, and the LR schedule."""
        if not self.partitions_weights:
            raise ValueError(f"{Path(load_dir) / tag}: saved on {saved_world_size} ranks; only a ZeRO-3 "
                             f"(--deepspeed ds_configs/zero3.json) checkpoint resumes on another number of ranks")
        error = None
        if self.ds.global_rank == 0:
            try:
                convert_to_universal(Path(load_dir) / tag)
            except Exception as e:  # every rank must hear of it, not wait at the barrier
                error = f"{Path(load_dir) / tag}: conversion to a universal checkpoint failed: {e}"
        error = broadcast_object(error)
        if error:
            raise CheckpointFileError(error)
        barrier()
        self.ds._config.load_universal_checkpoint = True
        try:
            with weights_only_torch_loads():
                path, client_state = self.ds.load_checkpoint(
                    str(Path(load_dir) / tag), tag=UNIVERSAL_DIRNAME, load_module_strict=False,
                    load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"{Path(load_dir) / tag / UNIVERSAL_DIRNAME}: could not be loaded")
        return client_state or {}


def build_deepspeed_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                           precision: str, dtype: torch.dtype) -> DeepSpeedEngine:
    """Wrap `model` in DeepSpeed ZeRO (ds_configs/ JSON with its "auto" fields filled from `cfg`)."""
    import deepspeed

    # the model at hand knows its hidden size (a benchmark's random LM has no --model-path to read)
    hidden = getattr(getattr(getattr(model, "base_lm", None), "config", None), "hidden_size", None)
    ds_config = build_ds_config(cfg, precision, hidden_size=hidden)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        register_weight_reads(model)
        # ZeRO-1/2 cast the whole module to the compute dtype (module.bfloat16()); ZeRO-3 leaves the
        # parameters built outside zero.Init (LoRA, the prefix, the Stage1 tail) as they are, and then
        # refuses to flatten a mix of bf16 and fp32 partitions.
        with torch.no_grad():
            for p in model.parameters():
                if not is_partitioned(p) and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
    factor = warmup_cosine(total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model, cfg),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    return DeepSpeedEngine(ds_engine, device, dtype)
