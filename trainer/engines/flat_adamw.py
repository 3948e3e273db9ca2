"""What the torch and ddp engines share: AdamW over flat fp32 master weights, stepped without a host sync.

Both keep the full (small, LoRA) optimizer state on every rank and differ only in how the
gradients are reduced: `--engine torch` packs the parameters themselves into one flat buffer per
LR group and all-reduces it once per step (torch_engine.py); `--engine ddp` leaves them to
PyTorch's DistributedDataParallel, which all-reduces its gradient buckets during the boundary
micro-batch's backward (ddp_engine.py). From there a step is the same few kernels over whole
buffers: one norm, one bf16 -> fp32 copy, one fused AdamW launch, one fp32 -> bf16 copy. It never
syncs with the host: the clip coefficient and the non-finite flag are device tensors handed to
the fused AdamW kernel (`grad_scale`/`found_inf`, the GradScaler protocol), and the LR schedule
counts applied steps on the device. `step()` returns a 0-d device bool that the loop reads when it
syncs anyway (at log and save steps).

Checkpoints: one file, `<save_dir>/<tag>/torch_engine_state.pt`, written by rank 0. The masters
have the same layout in both engines (per LR group, the parameters in `optimizer_groups` order,
each padded to `_ALIGN`), so a torch-engine checkpoint resumes under ddp and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from common.io import atomic_path
from trainer.config import TrainConfig
from trainer.engines.base import Engine
from trainer.engines.deepspeed_engine import weights_only_refusal
from trainer.engines.optim import AppliedStepLR, optimizer_groups, warmup_cosine

TORCH_ENGINE_STATE = "torch_engine_state.pt"  # <save_dir>/<tag>/ of a --engine torch or ddp checkpoint
TORCH_ENGINE_FORMAT = 1

_ALIGN = 64  # elements: every parameter view starts 128-byte aligned (bf16) for the GEMMs


def _offsets(params: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // _ALIGN) * _ALIGN
    return offsets, total


class FlatGroup:
    """The trainable parameters of one LR group and their fp32 masters, flat.

    `pack_params=True` (torch engine): the parameters become views of `flat` and their `.grad`
    views of `grad`, so autograd accumulates straight into one buffer (as DDP's
    `gradient_as_bucket_view`) that is all-reduced, normed and copied with one kernel each;
    `master` is the fp32 copy AdamW updates, None when the parameters are fp32 already (AdamW then
    updates `flat` itself).
    `pack_params=False` (ddp engine): the parameters keep their storage and their `.grad` belongs
    to DDP's buckets; `master` is always a flat fp32 copy (views per parameter), copied back into
    the parameters after each update.
    """

    def __init__(self, name: str, lr: float, named_params: list[tuple[str, torch.nn.Parameter]],
                 dtype: torch.dtype, device: torch.device, pack_params: bool):
        self.name, self.base_lr, self.dtype, self.packed = name, lr, dtype, pack_params
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        offsets, total = _offsets(self.params)
        sizes = [p.numel() for p in self.params]
        self.flat: Optional[torch.Tensor] = None
        self.grad: Optional[torch.Tensor] = None
        self.grad_views: list[torch.Tensor] = []
        if pack_params:
            self.flat = torch.zeros(total, dtype=dtype, device=device)
            self.grad = torch.zeros_like(self.flat)
            with torch.no_grad():
                for p, o, n in zip(self.params, offsets, sizes):
                    self.flat[o:o + n].copy_(p.detach().reshape(-1))
                    p.data = self.flat[o:o + n].view(p.shape)
                    self.grad_views.append(self.grad[o:o + n].view(p.shape))
            self.attach_grads()
            self.master = None if dtype == torch.float32 else self.flat.float()
        else:
            self.master = torch.zeros(total, dtype=torch.float32, device=device)
        self.master_grad = None if self.master is None else torch.zeros_like(self.master)
        self.master_views = [] if self.master is None or pack_params else [
            self.master[o:o + n].view(p.shape) for p, o, n in zip(self.params, offsets, sizes)]
        self.master_grad_views = [] if not self.master_views else [
            self.master_grad[o:o + n].view(p.shape) for p, o, n in zip(self.params, offsets, sizes)]
        if self.master_views:
            self.master_from_params()

    @property
    def opt_param(self) -> torch.Tensor:
        """The tensor AdamW updates (fp32), with its `.grad` set to the fp32 gradient buffer."""
        if self.master is None:
            self.flat.grad = self.grad
            return self.flat
        self.master.grad = self.master_grad
        return self.master

    def gradients(self) -> list[torch.Tensor]:
        """The tensors holding this group's gradient (reduced in place, normed)."""
        if self.packed:
            return [self.grad]
        return [p.grad for p in self.params]

    def attach_grads(self) -> None:
        """(Re)point every `.grad` at its view (a `zero_grad(set_to_none=True)` elsewhere unhooks them)."""
        for p, v in zip(self.params, self.grad_views):
            if p.grad is not v:
                p.grad = v

    def load_master_grad(self) -> None:
        if self.master is None:
            return
        if self.packed:
            self.master_grad.copy_(self.grad)
        else:
            torch._foreach_copy_(self.master_grad_views, self.gradients())

    def store_master(self) -> None:
        """The updated fp32 masters into the compute-dtype parameters."""
        if self.master is None:
            return
        if self.packed:
            self.flat.copy_(self.master)
        else:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master_views)

    def master_from_params(self) -> None:
        with torch.no_grad():
            if self.packed:
                if self.master is not None:
                    self.master.copy_(self.flat)
            else:
                torch._foreach_copy_(self.master_views, [p.detach() for p in self.params])

    def zero_grad(self) -> None:
        if self.packed:
            self.grad.zero_()
            self.attach_grads()
        else:
            torch._foreach_zero_([g for g in self.gradients() if g is not None])

    def saved_master(self) -> Optional[torch.Tensor]:
        """What a checkpoint keeps beyond the weights: the masters, None in fp32 (they equal the weights)."""
        return None if self.dtype == torch.float32 else self.master.cpu()


class FlatAdamWEngine(Engine):
    """Data-parallel AdamW over fp32 masters of the trainable weights (see the module doc).

    Every rank holds the full (small) optimizer state and applies the same update to the same
    reduced gradients, so the ranks stay identical and rank 0 alone writes checkpoints.
    Subclasses say whether the parameters are packed (`pack_params`), may wrap the model
    (`_wrap`, before the masters copy the weights) and reduce the gradients (`_reduce`).
    """

    pack_params = True
    kind = "torch"

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                 dtype: torch.dtype):
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"--engine {self.kind} runs on CUDA or CPU (fused AdamW), not {device}")
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
        named_groups = [(g["name"], g["lr"], [(ids[id(p)], p) for p in g["params"]]) for g in optimizer_groups(model, cfg)]
        self._wrap(model, cfg)
        self.groups = [FlatGroup(name, lr, params, dtype, device, self.pack_params) for name, lr, params in named_groups]
        self.optimizer = torch.optim.AdamW(
            [{"params": [g.opt_param], "name": g.name, "lr": g.base_lr} for g in self.groups],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay,
            fused=True)  # fused: one launch, and the only AdamW that reads grad_scale/found_inf
        self.schedule = AppliedStepLR(self.optimizer, [g.base_lr for g in self.groups],
                                      warmup_cosine(total_steps, o.warmup_ratio, o.min_lr_ratio), total_steps, device)
        self.micro_steps = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._grad_norm: Optional[torch.Tensor] = None

    # --- what a subclass changes ---------------------------------------------------------------

    def _wrap(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        """Called once the model is on its device and in its dtype, before the masters copy it."""

    def _reduce(self, grads: list[torch.Tensor]) -> None:
        """Average `grads` over the ranks, in place (at a boundary, before the norm)."""

    # --- the loop's interface ------------------------------------------------------------------

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
        grads = [t for g in self.groups for t in g.gradients()]
        self._reduce(grads)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        finite = torch.isfinite(norm)
        self.optimizer.found_inf = (~finite).float()  # the fused kernel leaves everything unchanged when 1
        # DeepSpeed's clip: divide by max(1, (norm + 1e-6) / max_norm), applied inside the fused kernel
        self.optimizer.grad_scale = (torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)
                                     if self.max_grad_norm > 0 else None)
        for g in self.groups:
            g.load_master_grad()
        self.optimizer.step()
        for g in self.groups:
            g.store_master()
        self.schedule.step(finite)
        self._skipped += ~finite
        self._grad_norm = norm
        self.zero_grad()
        return finite

    def zero_grad(self) -> None:
        for g in self.groups:
            g.zero_grad()

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
            "engine": self.kind,
            "weights": {n: p.detach().to("cpu", copy=True) for n, p in self._trainable()},
            "masters": [g.saved_master() for g in self.groups],
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
            raise FileNotFoundError(f"{path} not found: not a --engine torch checkpoint (nor ddp: they write the "
                                    "same file; a DeepSpeed one? then resume with --engine deepspeed)")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)  # a planted pickle runs no code
        except Exception as e:  # refused (not weights only), truncated, unreadable: name the file
            why = weights_only_refusal(e) or (str(e).splitlines() or [""])[0]
            raise ValueError(f"{path}: cannot load: {type(e).__name__}: {why}") from e
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
                if (g.dtype == torch.float32) != (m is None):
                    raise ValueError(f"{path}: saved with other precision (fp32 masters present: {m is not None})")
                if m is None:
                    g.master_from_params()
                else:
                    g.master.copy_(m)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["schedule"])
        self._skipped.fill_(int(payload["skipped_steps"]))
        self.micro_steps = int(payload["micro_steps"])
        self.zero_grad()
        return payload["client_state"]
