"""The training engine: the handful of methods the loop uses, one file per backend.

    engine = build_engine(model, cfg, total_steps, device)   # cfg.engine: "deepspeed" | "torch" | "ddp"
    out = engine.forward(batch); engine.backward(out.loss); applied = engine.step()

The backends do the same math: the loss of a micro-batch scaled by 1/gradient_accumulation_steps,
gradients summed over the accumulation window and averaged over ranks, global-norm clipping
(coefficient max_norm / (norm + 1e-6) when below 1), AdamW with two parameter groups on fp32 master
weights, warm-up + cosine LR over the applied optimizer steps (optim.py); a step whose gradient norm
is inf/NaN changes nothing (weights, optimizer state, LR schedule) and counts as skipped.

- deepspeed_engine.py: DeepSpeed ZeRO-1/2 from `--deepspeed` (the default).
- torch_engine.py: flat parameter buffers, one all-reduce per LR group at the optimizer step.
- ddp_engine.py: PyTorch DistributedDataParallel, `no_sync()` inside the accumulation window.
  The torch and ddp engines share their step and checkpoint file (flat_adamw.py: fp32 masters,
  fused AdamW, no per-step host sync).
- fsdp2_engine.py: FSDP2 `fully_shard` per decoder layer: weights, gradients and optimizer state
  sharded over the ranks (full fine-tuning, bases too big for one GPU); needs a meta-built model
  (`build_prefix_lm(meta=True)`, which trainer.train does for `--engine fsdp2`).

Before any backend sees the model, `build_engine` packs all LoRA weights into one trainable
tensor (models/flat_lora.py): DeepSpeed's host work is per trainable tensor (a gradient hook, an
inf/NaN check and a norm each), and a 7B model has ~450 LoRA tensors. Not under ZeRO-3: it partitions
every parameter, so the PEFT weights could no longer be views of the flat tensor's storage, and each
layer would need the whole flat tensor gathered to read its slice; there the adapters stay separate
tensors (logged once).

`zero3_model_init(cfg, precision)` is the context the model must be built in (a no-op unless
`--deepspeed` is a ZeRO-3 config).
"""

from __future__ import annotations

import logging

import torch

from common.runtime import resolve_device, resolve_precision
from models.flat_lora import attach_flat_lora
from trainer.config import TrainConfig
from trainer.engines.base import Engine
from trainer.engines.ddp_engine import DDPEngine
from trainer.engines.deepspeed_engine import (
    DeepSpeedEngine,
    build_deepspeed_engine,
    build_ds_config,
    zero3_model_init,
    zero_stage,
)
from trainer.engines.fsdp2_engine import FSDP2Engine
from trainer.engines.optim import optimizer_groups, warmup_cosine
from trainer.engines.torch_engine import TORCH_ENGINE_STATE, TorchEngine

log = logging.getLogger("trainer")

ENGINES = ("deepspeed", "torch", "ddp", "fsdp2")

__all__ = ["Engine", "DeepSpeedEngine", "TorchEngine", "DDPEngine", "FSDP2Engine", "ENGINES", "build_engine",
           "build_ds_config", "optimizer_groups", "warmup_cosine", "TORCH_ENGINE_STATE", "zero3_model_init",
           "zero_stage"]


def build_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int,
                 device: torch.device | None = None) -> Engine:
    """The `cfg.engine` backend over `model`: AdamW (two LR groups), warm-up + cosine over `total_steps`."""
    device = resolve_device(device)
    precision = resolve_precision(getattr(cfg.model, "precision", "auto"), device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    kind = getattr(cfg, "engine", "deepspeed")
    if kind not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)} (got {kind!r})")
    flat = None
    want_flat = getattr(cfg.model, "flat_lora", False) and getattr(cfg.model, "fused_lora", False)
    if want_flat and kind == "fsdp2":
        want_flat = False
        log.info("--engine fsdp2: flat LoRA packing off (one tensor over all layers cannot be sharded "
                 "per layer); the fused LoRA forward stays on")
    if want_flat and kind == "deepspeed" and zero_stage(cfg) == 3:
        want_flat = False
        log.info("--flat-lora is off under ZeRO-3 (%s): it partitions every parameter, so the LoRA weights stay "
                 "separate tensors", cfg.deepspeed)
    if want_flat:
        flat = attach_flat_lora(model)  # the engine then sees 1 LoRA tensor, not ~450
    if kind == "fsdp2":
        engine = FSDP2Engine(model, cfg, total_steps, device, dtype)
    elif kind == "torch":
        engine = TorchEngine(model, cfg, total_steps, device, dtype)
    elif kind == "ddp":
        engine = DDPEngine(model, cfg, total_steps, device, dtype)
    else:
        engine = build_deepspeed_engine(model, cfg, total_steps, device, precision, dtype)
    if flat is not None:
        flat.relink()  # every engine re-binds parameter storage (flat buffers, dtype/device moves)
        engine.flat_lora = flat
    return engine
