"""The training engine: DeepSpeed ZeRO-2 behind the handful of methods the loop uses.

    engine = build_engine(model, cfg, total_steps)
    out = engine.forward(batch); engine.backward(out.loss); applied = engine.step()

What `build_engine` decides so the DeepSpeed JSON (ds_configs/zero2.json) can say "auto":
- `train_micro_batch_size_per_gpu` = 1: one micro-batch is ONE packed row holding `--batch-size`
  examples (trainer/collate.py), so DeepSpeed's notion of a "sample" is a packed row. The examples
  per optimizer step are batch_size x gradient_accumulation_steps x world_size.
- AdamW (`torch_adam`: PyTorch's implementation, so no DeepSpeed op is JIT-built; FACTS.md: the
  FusedAdam build fails on the GPU image) with two parameter groups: LoRA + image prefix at `--lr`,
  the trainable Stage1 tail at `--encoder-lr`.
- Linear warm-up over `warmup_ratio` of the steps, then cosine decay: a torch `LambdaLR` handed to
  DeepSpeed, whose state is saved in DeepSpeed checkpoints (exact resume).
- `bf16.enabled` from `--precision` (auto: bf16 on CUDA, fp32 on CPU), clipping from `--max-grad-norm`.

Non-finite steps: ZeRO-2 checks the gradient norm before every update and, when it is inf/NaN,
zeroes the gradients and skips the update and the LR step (on all ranks alike, since the check is
all-reduced). `step()` returns whether the update was applied; no extra host sync is added.

The class is deliberately small (forward/backward/step/is_boundary/lr/save/load) so that another
backend (e.g. FSDP2) can stand behind the same methods.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.config import TrainConfig, resolve_ds_config_path


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """'auto' -> 'bf16' on CUDA, 'fp32' elsewhere."""
    if precision != "auto":
        return precision
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if dev.type == "cuda" else "fp32"


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0):
    """Multiplier of the peak LR at optimizer step `s` (0-based): linear warm-up then cosine decay."""
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _fill(section: dict, key: str, value: Any) -> None:
    """Set `key` when it is missing or "auto"; an explicit value in the JSON wins."""
    if section.get(key, "auto") == "auto":
        section[key] = value


def build_ds_config(cfg: TrainConfig, precision: str) -> dict:
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
    ds.pop("scheduler", None)  # ours is passed to deepspeed.initialize (exact-resumable LambdaLR)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(f"{path}: zero_optimization.stage must be 1 or 2 (got {stage}); "
                         "the non-finite-step skip relies on ZeRO's gradient-norm check")
    return ds


class Engine:
    """A DeepSpeed engine seen through the methods the training loop needs."""

    def __init__(self, ds_engine, device: torch.device, dtype: torch.dtype):
        self.ds = ds_engine
        self.device = device
        self.dtype = dtype

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (floats to the compute dtype); other entries pass through."""
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def forward(self, batch: dict):
        return self.ds(self.to_device(batch))

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

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
        self.ds.save_checkpoint(str(save_dir), tag=tag, client_state=client_state or {},
                                save_latest=False, exclude_frozen_parameters=True)

    def load(self, load_dir: str | Path, tag: str) -> dict:
        """Collective: restores trainable weights, optimizer, LR schedule; returns the client state."""
        path, client_state = self.ds.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed checkpoint {Path(load_dir) / tag} could not be loaded")
        return client_state or {}


def optimizer_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: LoRA + prefix at --lr, Stage1 tail at --encoder-lr (empty groups dropped)."""
    from trainer.model import param_groups

    groups = param_groups(model)
    lrs = {"lora_and_prefix": cfg.optim.lr, "stage1_tail": cfg.optim.encoder_lr}
    out = [{"name": name, "params": [p for p in params if p.requires_grad], "lr": lrs[name]}
           for name, params in groups.items() if any(p.requires_grad for p in params)]
    if not out:
        raise ValueError("the model has no trainable parameters (LoRA/prefix/tail all frozen?)")
    return out


def build_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int,
                 device: torch.device | None = None) -> Engine:
    """Wrap `model` in DeepSpeed ZeRO with AdamW (two LR groups) and warm-up + cosine over `total_steps`."""
    import deepspeed

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    precision = resolve_precision(getattr(cfg.model, "precision", "auto"), device)
    ds_config = build_ds_config(cfg, precision)
    factor = warmup_cosine(total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model, cfg),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return Engine(ds_engine, device, dtype)
