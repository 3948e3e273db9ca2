"""The model library under DeepSpeed ZeRO-3: where its code reads a weight outside that weight's own
module's forward, and gathering partitioned weights for saving.

ZeRO-3 keeps 1/world_size of every parameter on each rank; a module's forward pre-hook gathers the
module's own parameters and its forward post-hook releases them. That covers a weight only when the
module that owns it is called. Two places here read weights directly instead:

    PrefixLM.forward      the LM head's weight (and bias) in the chunked / Liger linear + cross-entropy,
                          which never builds the full logits, so never calls lm_head
    fused LoRA layers     lora_A / lora_B weights in the fused forward (models/lora_fused.py), which
                          never calls the lora_A / lora_B modules

`register_weight_reads` tells ZeRO-3 about both (DeepSpeed's external parameters: gathered for the
reading module's forward and its backward). The embedding splice (`embed_with_prefix`) and the
prefix call their modules, so the hooks cover them. Nothing here imports deepspeed unless a
parameter is partitioned, so the model library stays usable without it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.nn as nn

from models import lora_fused


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 partitioned parameter (its `.data` is an empty placeholder)."""
    return hasattr(p, "ds_id")


def any_partitioned(module: nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """The full values of `params` on every rank inside the block (ZeRO-3 partitioned ones are
    all-gathered, then released); a no-op for ordinary tensors. Collective when any is partitioned.
    With `modifier_rank`, that rank's in-place changes are scattered back on exit."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield


def register_weight_reads(model: nn.Module) -> int:
    """Declare to ZeRO-3 every weight `model` (a PrefixLM) reads outside its owner's forward (module
    doc); returns how many. Call before `deepspeed.initialize`."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    count = 0
    head = model.base_lm.get_output_embeddings()
    for p in (head.weight, getattr(head, "bias", None)):
        if isinstance(p, nn.Parameter):
            register_external_parameter(model, p)
            count += 1
    fused_cls = lora_fused.fused_lora_linear_class()
    for layer in model.modules():
        if type(layer) is not fused_cls:
            continue
        for name in layer.lora_A:
            for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                register_external_parameter(layer, w)
                count += 1
    return count


def gathered_state_dict(module: nn.Module, keep: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """Collective: `module`'s parameters and persistent buffers as full CPU tensors, one parameter
    gathered at a time, so a rank never holds more than one full weight on its device; only where
    `keep` (rank 0) is the dictionary filled (one full copy, in host memory). Tied weights appear
    under every name, as in `state_dict()`."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        with gathered([p]):
            if keep:
                out[prefix + name] = p.detach().to("cpu", copy=True)
    if keep:
        non_persistent = {f"{m_name}.{b}" if m_name else b for m_name, m in module.named_modules()
                          for b in getattr(m, "_non_persistent_buffers_set", ())}
        for name, b in module.named_buffers():
            if name not in non_persistent:
                out[prefix + name] = b.detach().to("cpu", copy=True)
    return out
