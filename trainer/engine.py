"""The training engine: the handful of methods the loop uses, over two backends.

    engine = build_engine(model, cfg, total_steps)      # cfg.engine: "deepspeed" | "torch"
    out = engine.forward(batch); engine.backward(out.loss); applied = engine.step()

Both backends do the same math: the loss of a micro-batch scaled by 1/gradient_accumulation_steps,
gradients summed over the accumulation window and averaged over ranks, global-norm clipping
(coefficient max_norm / (norm + 1e-6) when below 1), AdamW with two parameter groups (LoRA + image
prefix at `--lr`, the trainable Stage1 tail at `--encoder-lr`) on fp32 master weights, warm-up +
cosine LR over the APPLIED optimizer steps; a step whose gradient norm is inf/NaN changes nothing
(weights, optimizer state, LR schedule) and counts as skipped.

`--engine deepspeed` (`DeepSpeedEngine`, the spec's default): ZeRO-2 from ds_configs/zero2.json.
What `build_engine` decides so the DeepSpeed JSON can say "auto":
- `train_micro_batch_size_per_gpu` = 1: one micro-batch is ONE packed row holding `--batch-size`
  examples (models/collate.py), so DeepSpeed's notion of a "sample" is a packed row. The examples
  per optimizer step are batch_size x gradient_accumulation_steps x world_size.
- AdamW (`torch_adam`: PyTorch's implementation, so no DeepSpeed op is JIT-built; FACTS.md: the
  FusedAdam build fails on the GPU image).
- The warm-up + cosine schedule is a torch `LambdaLR` handed to DeepSpeed, whose state is saved in
  DeepSpeed checkpoints (exact resume); DeepSpeed does not step it on a skipped update.
- `bf16.enabled` from `--precision` (auto: bf16 on CUDA, fp32 on CPU), clipping from `--max-grad-norm`.
ZeRO-2 checks the gradient norm before every update and, when it is inf/NaN, zeroes the gradients
and skips the update and the LR step (on all ranks alike, since the check is all-reduced).

Before either backend sees the model, `build_engine` packs all LoRA weights into one trainable
tensor (models/flat_lora.py): DeepSpeed's host work is per trainable tensor (a hook, an inf/NaN
check and a norm each), which over ~450 LoRA tensors idled the GPU (H100, 7B shape: ZeRO-2 9.3k ->
12.6-13.1k real tokens/s with the flat tensor).

`--engine torch` (`TorchEngine`): a lean data-parallel engine for LoRA, where the optimizer state
is small (~42M parameters for Mistral-7B) and ZeRO's sharding buys nothing; its optimizer step
takes ~2 ms against ZeRO-2's ~9 ms (which syncs with the host). The trainable parameters are packed into
one flat buffer per group (the parameters and their `.grad` become views of it), so a step is a
few kernels over whole buffers: one all-reduce, one norm, one bf16 -> fp32 copy, one fused AdamW
launch, one fp32 -> bf16 copy. It never syncs with the host: the clip coefficient and the
non-finite flag are device tensors handed to the fused AdamW kernel (`grad_scale`/`found_inf`, the
GradScaler protocol), and the LR schedule counts applied steps on the device.

`step()` returns whether the update was applied: a Python bool (DeepSpeed) or a 0-d bool tensor on
the device (torch) that the caller reads when it syncs anyway (trainer/train.py: at log steps).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from common.io import atomic_path
from common.runtime import resolve_device, resolve_precision
from models.flat_lora import attach_flat_lora
from models.prefix_lm import param_groups
from trainer.config import TrainConfig, resolve_ds_config_path

TORCH_ENGINE_STATE = "torch_engine_state.pt"  # <save_dir>/<tag>/ of a --engine torch checkpoint
TORCH_ENGINE_FORMAT = 1


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
    # PyTorch's fused AdamW: one kernel over the fp32 partition instead of foreach's several (DeepSpeed
    # passes params it does not know through to torch.optim.AdamW); the torch engine uses it too.
    params.setdefault("fused", True)
    ds.pop("scheduler", None)  # ours is passed to deepspeed.initialize (exact-resumable LambdaLR)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(f"{path}: zero_optimization.stage must be 1 or 2 (got {stage}); "
                         "the non-finite-step skip relies on ZeRO's gradient-norm check")
    return ds


class Engine:
    """What the training loop sees of an engine (both backends)."""

    device: torch.device
    dtype: torch.dtype  # compute dtype of the weights and of the float inputs
    flat_lora = None  # models.flat_lora.FlatLora when build_engine packed the LoRA weights

    @property
    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

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
        return self.module(self.to_device(batch))


class DeepSpeedEngine(Engine):
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


# ---------------------------------------------------------------------------------------------
# The torch engine
# ---------------------------------------------------------------------------------------------

_ALIGN = 64  # elements: every parameter view starts 128-byte aligned (bf16) for the GEMMs


class FlatGroup:
    """The trainable parameters of one LR group packed into one flat buffer.

    The parameters become views of `flat` and their `.grad` views of `grad`, so autograd
    accumulates straight into one buffer (as DDP's `gradient_as_bucket_view`) that is all-reduced,
    normed and copied with one kernel each. `master` is the fp32 copy AdamW updates; None when the
    parameters are fp32 already (the optimizer then updates `flat` itself).
    """

    def __init__(self, name: str, lr: float, named_params: list[tuple[str, torch.nn.Parameter]],
                 dtype: torch.dtype, device: torch.device):
        self.name, self.base_lr = name, lr
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        offsets, total = [], 0
        for p in self.params:
            offsets.append(total)
            total += -(-p.numel() // _ALIGN) * _ALIGN
        self.flat = torch.zeros(total, dtype=dtype, device=device)
        self.grad = torch.zeros_like(self.flat)
        self.grad_views = []
        with torch.no_grad():
            for p, o in zip(self.params, offsets):
                n = p.numel()
                self.flat[o:o + n].copy_(p.detach().reshape(-1))
                p.data = self.flat[o:o + n].view(p.shape)
                self.grad_views.append(self.grad[o:o + n].view(p.shape))
        self.attach_grads()
        if dtype == torch.float32:
            self.master, self.master_grad = None, None
        else:
            self.master = self.flat.float()
            self.master_grad = torch.zeros_like(self.master)

    @property
    def opt_param(self) -> torch.Tensor:
        """The tensor AdamW updates (fp32), with its `.grad` set to the fp32 gradient buffer."""
        if self.master is None:
            self.flat.grad = self.grad
            return self.flat
        self.master.grad = self.master_grad
        return self.master

    def attach_grads(self) -> None:
        """(Re)point every `.grad` at its view (a `zero_grad(set_to_none=True)` elsewhere unhooks them)."""
        for p, v in zip(self.params, self.grad_views):
            if p.grad is not v:
                p.grad = v


class AppliedStepLR:
    """`warmup_cosine` indexed by the number of APPLIED optimizer steps, counted on the device.

    DeepSpeed does not step its LambdaLR on a skipped (non-finite) update. Counting the applied
    steps in a device tensor keeps that rule without reading the skip flag on the host: the group
    LRs are 0-d fp32 device tensors (read by the fused AdamW kernel) set from a table of the
    schedule's factors. Equal to `LambdaLR(optimizer, warmup_cosine(...))` stepped on applied steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: Callable[[int], float],
                 total_steps: int, device: torch.device):
        self.optimizer = optimizer
        self.base_lrs = list(base_lrs)
        self.factors = torch.tensor([factor(s) for s in range(max(1, total_steps) + 1)], dtype=torch.float64,
                                    device=device)  # past the end the schedule stays at its last value
        self.applied = torch.zeros((), dtype=torch.int64, device=device)
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in base_lrs]
        self.bind()

    def bind(self) -> None:
        """Hand the LR tensors to the optimizer's groups (again after `optimizer.load_state_dict`)."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        self._set_lrs()

    def step(self, applied: torch.Tensor) -> None:
        self.applied += applied
        self._set_lrs()

    def _set_lrs(self) -> None:
        idx = self.applied.clamp(max=self.factors.numel() - 1).reshape(1)
        f = self.factors.index_select(0, idx).reshape(())  # tensor indexing, no host sync
        for lr, base in zip(self.lrs, self.base_lrs):
            lr.copy_(f * base)

    def state_dict(self) -> dict:
        return {"applied": int(self.applied), "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.applied.fill_(int(state["applied"]))
        self.bind()


class TorchEngine(Engine):
    """Data-parallel AdamW over fp32 masters of flat-packed trainable weights (see the module doc).

    Every rank holds the full (small) optimizer state and applies the same update to the same
    all-reduced gradients, so the ranks stay identical and rank 0 alone writes checkpoints.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                 dtype: torch.dtype):
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"--engine torch runs on CUDA or CPU (fused AdamW), not {device}")
        self.model, self.device, self.dtype = model, device, dtype
        o = cfg.optim
        self.grad_accum = o.gradient_accumulation_steps
        self.max_grad_norm = o.max_grad_norm
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        with torch.no_grad():  # like DeepSpeed bf16: every floating parameter in the compute dtype
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        model.to(device)
        ids = {id(p): n for n, p in model.named_parameters()}
        self.groups = [FlatGroup(g["name"], g["lr"], [(ids[id(p)], p) for p in g["params"]], dtype, device)
                       for g in optimizer_groups(model, cfg)]
        self.optimizer = torch.optim.AdamW(
            [{"params": [g.opt_param], "name": g.name, "lr": g.base_lr} for g in self.groups],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay,
            fused=True)  # fused: one launch, and the only AdamW that reads grad_scale/found_inf
        self.schedule = AppliedStepLR(self.optimizer, [g.base_lr for g in self.groups],
                                      warmup_cosine(total_steps, o.warmup_ratio, o.min_lr_ratio), total_steps, device)
        self.micro_steps = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._grad_norm: Optional[torch.Tensor] = None

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()  # as DeepSpeed: the window's gradients average its losses

    def is_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> bool | torch.Tensor:
        """At a boundary: the update; returns a 0-d device bool, False when it was skipped (non-finite)."""
        boundary = self.is_boundary()
        self.micro_steps += 1
        if not boundary:
            return True
        grads = [g.grad for g in self.groups]
        if self.world_size > 1:
            for g in grads:  # one collective per group buffer
                g.div_(self.world_size)
                dist.all_reduce(g)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        finite = torch.isfinite(norm)
        self.optimizer.found_inf = (~finite).float()  # the fused kernel leaves everything unchanged when 1
        # DeepSpeed's clip: divide by max(1, (norm + 1e-6) / max_norm), applied inside the fused kernel
        self.optimizer.grad_scale = (torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)
                                     if self.max_grad_norm > 0 else None)
        masters = [g for g in self.groups if g.master is not None]
        if masters:
            torch._foreach_copy_([g.master_grad for g in masters], [g.grad for g in masters])
        self.optimizer.step()
        if masters:
            torch._foreach_copy_([g.flat for g in masters], [g.master for g in masters])
        self.schedule.step(finite)
        self._skipped += ~finite
        self._grad_norm = norm
        self.zero_grad()
        return finite

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad.zero_()
            g.attach_grads()

    @property
    def skipped_steps(self) -> int:
        return int(self._skipped)

    def lr(self) -> dict[str, float]:
        return {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}

    def grad_norm(self) -> Optional[float]:
        """The last step's global gradient norm before clipping (inf/NaN on a skipped step)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    # --- checkpoints: one file under <save_dir>/<tag>/, written by rank 0 ---------------------

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for g in self.groups for n, p in zip(g.names, g.params)]

    def save(self, save_dir: str | Path, tag: str, client_state: dict | None = None) -> None:
        """Trainable weights, fp32 masters, optimizer + LR schedule, client state (rank 0 writes,
        atomically: every rank holds the same state). Frozen base weights are not saved."""
        if self.rank != 0:
            return
        payload = {
            "format": TORCH_ENGINE_FORMAT,
            "weights": {n: p.detach().to("cpu", copy=True) for n, p in self._trainable()},
            "masters": [None if g.master is None else g.master.cpu() for g in self.groups],
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "skipped_steps": self.skipped_steps,
            "micro_steps": self.micro_steps,
            "world_size": self.world_size,
            "client_state": client_state or {},
        }
        with atomic_path(Path(save_dir) / tag / TORCH_ENGINE_STATE) as tmp:
            torch.save(payload, tmp)

    def load(self, load_dir: str | Path, tag: str) -> dict:
        """Restores what `save` wrote (every rank reads the file); returns the client state."""
        path = Path(load_dir) / tag / TORCH_ENGINE_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a --engine torch checkpoint (a DeepSpeed one? "
                                    "then resume with --engine deepspeed)")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != TORCH_ENGINE_FORMAT:
            raise ValueError(f"{path}: format {payload.get('format')!r}, expected {TORCH_ENGINE_FORMAT}")
        weights = payload["weights"]
        mine = dict(self._trainable())
        if set(weights) != set(mine):
            missing, extra = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
            raise ValueError(f"{path}: trainable parameters differ from the model's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        with torch.no_grad():
            for n, p in mine.items():
                if weights[n].shape != p.shape:
                    raise ValueError(f"{path}: {n} has shape {tuple(weights[n].shape)}, the model {tuple(p.shape)}")
                p.copy_(weights[n])
            for g, m in zip(self.groups, payload["masters"]):
                if (g.master is None) != (m is None):
                    raise ValueError(f"{path}: saved with other precision (fp32 masters present: {m is not None})")
                if m is not None:
                    g.master.copy_(m)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["schedule"])
        self._skipped.fill_(int(payload["skipped_steps"]))
        self.micro_steps = int(payload["micro_steps"])
        self.zero_grad()
        return payload["client_state"]


def optimizer_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: LoRA + prefix at --lr, Stage1 tail at --encoder-lr (empty groups dropped)."""
    groups = param_groups(model)
    lrs = {"lora_and_prefix": cfg.optim.lr, "stage1_tail": cfg.optim.encoder_lr}
    out = [{"name": name, "params": [p for p in params if p.requires_grad], "lr": lrs[name]}
           for name, params in groups.items() if any(p.requires_grad for p in params)]
    if not out:
        raise ValueError("the model has no trainable parameters (LoRA/prefix/tail all frozen?)")
    return out


def build_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int,
                 device: torch.device | None = None) -> Engine:
    """The `cfg.engine` backend over `model`: AdamW (two LR groups), warm-up + cosine over `total_steps`."""
    device = resolve_device(device)
    precision = resolve_precision(getattr(cfg.model, "precision", "auto"), device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    kind = getattr(cfg, "engine", "deepspeed")
    if kind not in ("deepspeed", "torch"):
        raise ValueError(f"--engine must be 'deepspeed' or 'torch' (got {kind!r})")
    flat = None
    if getattr(cfg.model, "flat_lora", False) and getattr(cfg.model, "fused_lora", False):
        flat = attach_flat_lora(model)  # the engine then sees 1 LoRA tensor, not ~450
    if kind == "torch":
        engine = TorchEngine(model, cfg, total_steps, device, dtype)
    else:
        engine = _build_deepspeed_engine(model, cfg, total_steps, device, precision, dtype)
    if flat is not None:
        flat.relink()  # both engines re-bind parameter storage (flat buffers, dtype/device moves)
        engine.flat_lora = flat
    return engine


def _build_deepspeed_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                            precision: str, dtype: torch.dtype) -> DeepSpeedEngine:
    """Wrap `model` in DeepSpeed ZeRO (ds_configs/ JSON with its "auto" fields filled from `cfg`)."""
    import deepspeed

    ds_config = build_ds_config(cfg, precision)
    factor = warmup_cosine(total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model, cfg),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    return DeepSpeedEngine(ds_engine, device, dtype)
