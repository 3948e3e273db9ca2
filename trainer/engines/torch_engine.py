"""`--engine torch`: a lean data-parallel engine for LoRA.

LoRA's optimizer state is small, so ZeRO's sharding buys nothing; what costs is host work per
tensor and per step. The trainable parameters are packed into one flat buffer per LR group (the
parameters and their `.grad` become views of it), so the gradient exchange is one all-reduce per
group at the optimizer step; the step itself is flat_adamw.py's (fused AdamW on fp32 masters, no
host sync), shared with `--engine ddp`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.engines.flat_adamw import TORCH_ENGINE_STATE, FlatAdamWEngine

__all__ = ["TorchEngine", "TORCH_ENGINE_STATE"]


class TorchEngine(FlatAdamWEngine):
    """Flat parameter buffers, one all-reduce per LR group at each optimizer step."""

    pack_params = True
    kind = "torch"

    def _reduce(self, grads: list[torch.Tensor]) -> None:
        if self.world_size > 1:
            for g in grads:  # one collective per group buffer
                g.div_(self.world_size)
                dist.all_reduce(g)
