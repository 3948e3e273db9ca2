"""The optimizer's parts both engines share: AdamW's parameter groups and the LR schedule.

Two LR groups: the LoRA adapters and the image prefix at `--lr`, the trainable Stage1 tail at
`--encoder-lr`. The schedule is linear warm-up then cosine decay over the APPLIED optimizer steps:
a step skipped for a non-finite gradient norm does not advance it (DeepSpeed does not step its
LambdaLR then; `AppliedStepLR` keeps the same rule for the torch engine without a host sync).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from models.prefix_lm import param_groups
from trainer.config import TrainConfig


def optimizer_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: LoRA + prefix at --lr, Stage1 tail at --encoder-lr (empty groups dropped)."""
    groups = param_groups(model)
    lrs = {"lora_and_prefix": cfg.optim.lr, "stage1_tail": cfg.optim.encoder_lr}
    out = [{"name": name, "params": [p for p in params if p.requires_grad], "lr": lrs[name]}
           for name, params in groups.items() if any(p.requires_grad for p in params)]
    if not out:
        raise ValueError("the model has no trainable parameters (LoRA/prefix/tail all frozen?)")
    return out


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0):
    """Multiplier of the peak LR at optimizer step `s` (0-based): linear warm-up then cosine decay."""
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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
