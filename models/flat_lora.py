"""All LoRA weights as ONE trainable tensor: what the optimizer and DeepSpeed see of the adapters.

Why: LoRA r=32 on the seven projections of Mistral-7B is 448 small tensors. DeepSpeed ZeRO-2 does
host work per trainable tensor: a gradient hook that copies each gradient into its bucket, then at
the optimizer step an inf/NaN check (amax, amin, isfinite, ...) and a norm per tensor. A LoRA step
is host-bound (the GPU already waits on the host for the model's own small kernels), so every one
of those ~450 hooks and per-tensor checks adds directly to the step time; with one flat tensor
there is one hook, one check and one norm. README.md's Performance section has the measurements.

How (the PEFT modules and files stay standard):

    flat = nn.Parameter(cat(every A and B, flattened))          # model.flat_lora.flat: trainable
    lora_A/B.weight -> frozen, .data = a view of flat's data     # state_dict / save_pretrained /
                                                                 # generation read live values
    every forward with grad: pieces = flat.split(sizes)          # one autograd node...
        layer._flat_lora = {adapter: (A view, B view)}           # ...the fused LoRA forward uses
    backward: the 448 gradients meet in split's backward, ONE cat into flat.grad (one hook).

An engine may re-bind `flat.data` (DeepSpeed flattens its parameters into its own buffer, the
torch engine too; dtype/device moves do the same): `relink()` points the PEFT weights at the new
storage again; `trainer.engines.build_engine` calls it once the engine is built, and the DeepSpeed
engine again after loading a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.lora import Linear

from models import lora_fused


class FlatLora(nn.Module):
    """One flat trainable parameter behind every (fused) PEFT LoRA layer's A and B weights."""

    def __init__(self, entries: list[tuple[nn.Module, str]]):
        super().__init__()
        if not entries:
            raise ValueError("FlatLora: no LoRA layers to pack")
        weights: list[nn.Parameter] = []
        for layer, name in entries:
            weights += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        dtypes = {w.dtype for w in weights}
        devices = {w.device for w in weights}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"FlatLora: LoRA weights differ in dtype {dtypes} or device {devices}")
        # Plain Python state, not submodules: the layers already belong to the model.
        self._entries = list(entries)
        self._weights = weights
        self.shapes = [tuple(w.shape) for w in weights]
        self.sizes = [w.numel() for w in weights]
        with torch.no_grad():
            self.flat = nn.Parameter(torch.cat([w.detach().reshape(-1) for w in weights]))
        for w in weights:
            w.requires_grad_(False)
        for layer, _ in entries:
            layer._flat_lora_owner = True
        self.relink()  # also sets every layer's `_flat_lora` to None until the first publish()

    def relink(self) -> None:
        """Make every PEFT LoRA weight a view of `flat`'s current storage (values are flat's), and drop
        views handed out by an earlier `publish()`: they may point at the storage being replaced."""
        with torch.no_grad():
            for w, piece, shape in zip(self._weights, self.flat.data.split(self.sizes), self.shapes):
                w.data = piece.view(shape)
        for layer, _ in self._entries:
            layer._flat_lora = None

    def is_linked(self) -> bool:
        base = self.flat.data.untyped_storage().data_ptr()
        return all(w.data.untyped_storage().data_ptr() == base for w in self._weights)

    def publish(self) -> None:
        """Hand each layer differentiable views of `flat` for the coming forward (and the
        activation-checkpoint recompute of its backward, which reads the same views)."""
        pieces = self.flat.split(self.sizes)
        for i, (layer, name) in enumerate(self._entries):
            layer._flat_lora = {name: (pieces[2 * i].view(self.shapes[2 * i]),
                                       pieces[2 * i + 1].view(self.shapes[2 * i + 1]))}


def lora_entries(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(layer, adapter name) of every trainable adapter of the fused LoRA layers, in module order.

    Raises if the model also has LoRA layers that the fused forward does not run (their adapters
    would silently stop learning once packed)."""
    fused_cls = lora_fused.fused_lora_linear_class()
    entries = []
    for mod_name, m in model.named_modules():
        if not isinstance(m, Linear):
            continue
        names = [n for n in m.lora_A if m.lora_A[n].weight.requires_grad]
        if not names:
            continue
        if type(m) is not fused_cls or len(m.active_adapters) != 1 or names != list(m.active_adapters):
            raise ValueError(f"flat LoRA needs the fused LoRA forward with one active adapter; {mod_name} "
                             f"is {type(m).__name__} with adapters {names} (use --no-flat-lora)")
        entries.append((m, names[0]))
    return entries


def attach_flat_lora(model: nn.Module) -> FlatLora | None:
    """Pack the LoRA weights of `model` (a PrefixLM) into `model.flat_lora`; None if it has none.

    Idempotent: a model that already has its FlatLora gets it back."""
    existing = getattr(model, "flat_lora", None)
    if isinstance(existing, FlatLora):
        return existing
    entries = lora_entries(model)
    if not entries:
        return None
    model.flat_lora = FlatLora(entries)
    return model.flat_lora
