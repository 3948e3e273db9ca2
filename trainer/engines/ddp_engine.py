"""`--engine ddp`: PyTorch DistributedDataParallel over the model, with the torch engine's step.

The gradient exchange is DDP's, set up for LoRA with models/flat_lora.py (all adapters in one
trainable tensor):
- Micro-batches inside an accumulation window run under `no_sync()`: gradients accumulate
  locally and only the boundary micro-batch's backward all-reduces (one exchange per optimizer
  step, as the torch engine; ZeRO-2 reduces after every micro-batch).
- One bucket for all trainable gradients (`bucket_cap_mb` = their size): the flat LoRA gradient
  is complete only when backward reaches the first decoder layer (split's backward is one `cat`),
  and the prefix / Stage1 tail come after it, so smaller buckets could not overlap anything; one
  bucket is one all-reduce launch.
- `gradient_as_bucket_view`: `.grad` is a view of the bucket (no copy in or out); the step reads
  it in place and zeroes it in place.
- `find_unused_parameters` only when a micro-batch may leave a trainable tensor unused (the
  `text_summary` task's examples carry no image, so a batch of only those skips the prefix): it
  costs a walk of the autograd graph per reducing backward. Not `static_graph`: it cannot start
  with a `no_sync()` micro-batch (the reducer asserts), and it has nothing to save here.
- Frozen weights and buffers are left out of DDP's start-up broadcast: every rank loads the same
  base model, and broadcasting 7B frozen weights would only cost time. The trainable ones (LoRA,
  prefix, tail) are broadcast from rank 0.
The update (norm, clip, non-finite skip, fused AdamW on fp32 masters, LR schedule) and the
checkpoint file are flat_adamw.py's, shared with `--engine torch`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from trainer.config import TrainConfig
from trainer.engines.flat_adamw import FlatAdamWEngine
from trainer.schedules import build_phases, enabled_tasks

# Tasks whose examples carry no image prefix: a micro-batch of only these leaves the prefix unused.
IMAGE_FREE_TASKS = ("text_summary",)


def may_skip_prefix(cfg: TrainConfig) -> bool:
    """Whether some micro-batch may use no image prefix (so DDP must look for unused parameters)."""
    return any(t in IMAGE_FREE_TASKS for t in enabled_tasks(build_phases(cfg.schedule)))


class DDPEngine(FlatAdamWEngine):
    """DistributedDataParallel gradient exchange + flat_adamw's step (see the module doc)."""

    pack_params = False  # DDP owns the gradients (bucket views); the masters are flat
    kind = "ddp"

    def _wrap(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        self.ddp = None
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # defined from the start (DDP makes them bucket views at construction)
            for p in trainable:
                p.grad = torch.zeros_like(p)
        if self.world_size == 1:
            return  # nothing to exchange: the plain model, the same step
        ignored = [n for n, p in model.named_parameters() if not p.requires_grad]
        ignored += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        bucket_mb = sum(p.numel() * p.element_size() for p in trainable) / 2**20 + 1
        unused = may_skip_prefix(cfg)
        self.ddp = DistributedDataParallel(
            model, device_ids=None,  # inputs arrive on the device already (Engine.to_device)
            bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True,
            find_unused_parameters=unused)

    def forward(self, batch: dict):
        if self.ddp is None or not torch.is_grad_enabled():  # validation: nothing to reduce
            return self.model(self.to_device(batch))
        # DDP decides in forward whether the coming backward reduces: no exchange inside the window.
        with contextlib.nullcontext() if self.is_boundary() else self.ddp.no_sync():
            return self.ddp(self.to_device(batch))
