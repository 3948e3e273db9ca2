"""A leaner forward for PEFT's LoRA `Linear` layers: same parameters, same math, fewer kernels.

PEFT computes `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`, which on a GPU is two
GEMMs plus a dropout kernel, a `mul` and an `add` over the full `[tokens, out_features]` output
(and their backward twins), per adapted module. Here:

    out = base(x)                                               # frozen bf16 GEMM
    out = addmm(out, dropout(x) @ A^T, B^T, alpha=scaling)      # the add + scale ride in the GEMM epilogue

and the dropout is computed once per distinct input tensor: q/k/v read the same normed hidden
states, gate/up too, so one mask (and one saved dropped tensor) serves them all instead of three or
two. Each module still sees an independent-looking Bernoulli(1 - p) mask with 1/(1-p) scaling, i.e.
the same marginal distribution as PEFT; only the masks of q/k/v (and of gate/up) are now equal.
With dropout 0 (or in eval mode) the result equals PEFT's forward up to float reassociation.

The layers keep their class hierarchy (a subclass of `peft.tuners.lora.Linear` is swapped in as
the instance's `__class__`) and their parameters, so `state_dict`, `save_pretrained`, merging and
loading stay standard PEFT. Anything the fast path does not cover (merged / disabled adapters,
mixed-adapter batches, DoRA and other variants, adapter dtype != output dtype) falls back to PEFT's
own forward.

    n = fuse_lora_linears(peft_model)   # in place; returns how many layers were switched
    shared_dropout_cache(peft_model).clear()   # after a forward, to drop the cached tensors
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharedDropout:
    """Dropout that returns the same dropped tensor for repeated calls on the same input tensor.

    Keyed on the identity (a weak reference) and version of the input and on `p`, so a new
    forward, an in-place change of the input, or a recompute under activation checkpointing (new
    tensors, RNG state restored by torch.utils.checkpoint) draws a fresh mask. Only the latest
    input is remembered: q/k/v (and gate/up) are called back to back on the same tensor.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._src: weakref.ref | None = None
        self._key: tuple | None = None
        self._out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        if p == 0.0 or not training:
            return x
        key = (x._version, p, torch.is_grad_enabled())
        if self._src is not None and self._src() is x and self._key == key:
            return self._out
        out = F.dropout(x, p, training=True)
        self._src, self._key, self._out = weakref.ref(x), key, out
        return out


def _lora_linear_class():
    from peft.tuners.lora import Linear

    return Linear


_FUSED_CLASS: type | None = None


def fused_lora_linear_class() -> type:
    """`FusedLoraLinear`, a subclass of `peft.tuners.lora.Linear` with the fused forward (built
    lazily so importing this module does not import PEFT)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
        base = _lora_linear_class()

        class FusedLoraLinear(base):  # noqa: D401 - forward documented in the module docstring
            _shared_dropout: SharedDropout

            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                member = getattr(self, "_proj_group", None)
                if member is not None and not args and not kwargs:
                    out = member[0].output(member[1], x)
                    if out is not None:
                        return out
                if args or kwargs or not _fast_path_ok(self):
                    if getattr(self, "_flat_lora_owner", False) and torch.is_grad_enabled():
                        raise RuntimeError("a LoRA layer packed by trainer.flat_lora must run the fused "
                                           "forward to train (merged/disabled adapter or extra arguments?)")
                    return super().forward(x, *args, **kwargs)
                return _fused_forward(self, x)

            def __repr__(self) -> str:
                return "fused_" + super().__repr__()

        _FUSED_CLASS = FusedLoraLinear
    return _FUSED_CLASS


def _fast_path_ok(layer) -> bool:
    if layer.disable_adapters or layer.merged or layer.lora_variant:
        return False
    return isinstance(layer.base_layer, nn.Linear)


def _adapter_weights(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter: trainer.flat_lora's differentiable views when it published them."""
    flat = getattr(layer, "_flat_lora", None)
    return flat[name] if flat is not None else (layer.lora_A[name].weight, layer.lora_B[name].weight)


def _fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    out2d = result.reshape(-1, result.shape[-1])
    x2d = None
    # trainer.flat_lora: differentiable views of the one flat trainable tensor (None: PEFT's own,
    # e.g. generation, where the weights are views of the same storage anyway).
    flat = getattr(layer, "_flat_lora", None)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = flat[name] if flat is not None else (layer.lora_A[name].weight, layer.lora_B[name].weight)
        if a.dtype != x.dtype or b.dtype != out2d.dtype:  # e.g. fp32 adapters on a bf16 base: PEFT's casts
            if flat is not None:  # PEFT's forward would use the frozen weights: no gradient would flow
                raise RuntimeError(f"flat LoRA: adapter dtype {a.dtype} != input dtype {x.dtype}; "
                                   "the engine should have cast both (use --no-flat-lora otherwise)")
            return _lora_linear_class().forward(layer, x)
        drop = layer.lora_dropout[name]
        p = float(getattr(drop, "p", 0.0)) if isinstance(drop, nn.Dropout) else 0.0
        xd = layer._shared_dropout(x, p, drop.training)
        x2d = xd.reshape(-1, xd.shape[-1])
        # (xd @ A^T) @ B^T * scaling + out, the scale and the add inside the second GEMM.
        out2d = torch.addmm(out2d, F.linear(x2d, a), b.t(), alpha=layer.scaling[name])
    return out2d.view(result.shape)


def fuse_lora_linears(model: nn.Module) -> int:
    """Switch every plain PEFT LoRA `Linear` in `model` to the fused forward, in place.

    All switched layers share one `SharedDropout` (attached to the model, see
    `shared_dropout_cache`). Returns the number of layers switched.
    """
    base, fused = _lora_linear_class(), fused_lora_linear_class()
    cache = shared_dropout_cache(model) or SharedDropout()
    count = 0
    for module in model.modules():
        if type(module) is base or type(module) is fused:
            module.__class__ = fused
            module._shared_dropout = cache
            count += 1
    if count:
        model._lora_shared_dropout = cache
    return count


def shared_dropout_cache(model: nn.Module) -> SharedDropout | None:
    """The `SharedDropout` that `fuse_lora_linears` attached to `model` (None if not fused)."""
    return getattr(model, "_lora_shared_dropout", None)


# ---------------------------------------------------------------------------------------------
# Sibling projections (q/k/v, gate/up): one GEMM each for the base, LoRA A and LoRA B
# ---------------------------------------------------------------------------------------------

SIBLING_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class ProjectionGroup:
    """LoRA layers that read the same input, computed together.

    Per group (instead of per layer): ONE frozen-base GEMM against the concatenated weights (the
    layers' weights become row-slices of one tensor, so no memory is added), ONE GEMM against the
    stacked LoRA A weights and ONE against the block-diagonal of the B weights, with the scale and
    the add in its epilogue. The extra FLOPs of the zero blocks are ~2% of the group's base GEMM at
    r=32. The first layer called computes all outputs; its siblings, called next on the same input
    tensor (HF calls q, k, v back to back, and gate, up), get theirs from the cache. A call pattern
    the group cannot serve (another input, a merged or disabled adapter, trainable base weights,
    unequal scaling or dropout) makes the layer run alone: same result, more kernels.
    """

    def __init__(self, layers: list) -> None:
        self.layers = list(layers)
        self.sizes = [layer.base_layer.out_features for layer in self.layers]
        self._fused_weight: torch.Tensor | None = None
        self._drop()

    def _drop(self) -> None:
        self._src: weakref.ref | None = None
        self._key: tuple | None = None
        self._outs: tuple | None = None
        self._served: set[int] = set()

    def _eligible(self, x: torch.Tensor) -> str | None:
        """The single active adapter name if the group can compute all outputs, else None."""
        first = self.layers[0]
        names = first.active_adapters
        if len(names) != 1:
            return None
        name = names[0]
        for layer in self.layers:
            base = layer.base_layer
            if (not _fast_path_ok(layer) or layer.active_adapters != names or name not in layer.lora_A
                    or base.bias is not None or base.weight.requires_grad or base.weight.dtype != x.dtype
                    or layer.scaling[name] != first.scaling[name]):
                return None
            drop, drop0 = layer.lora_dropout[name], first.lora_dropout[name]
            if (type(drop) is not type(drop0) or getattr(drop, "p", 0.0) != getattr(drop0, "p", 0.0)
                    or drop.training != drop0.training):
                return None
            a, b = _adapter_weights(layer, name)
            if a.dtype != x.dtype or b.dtype != x.dtype:
                return None
        return name

    def fused_weight(self) -> torch.Tensor:
        """The concatenated base weights; the layers' weights are re-pointed at its row slices
        (again after anything re-allocated them: a dtype/device move, a state-dict swap)."""
        weights = [layer.base_layer.weight for layer in self.layers]
        fused = self._fused_weight
        if fused is None or not _row_slices_of(weights, fused):
            with torch.no_grad():
                fused = torch.cat([w.detach() for w in weights])
                start = 0
                for w in weights:
                    w.data = fused[start:start + w.shape[0]]
                    start += w.shape[0]
            self._fused_weight = fused
        return fused

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        key = (x._version, torch.is_grad_enabled())
        if not (self._src is not None and self._src() is x and self._key == key and index not in self._served):
            self._drop()
            name = self._eligible(x)
            if name is None:
                return None
            self._outs = self._compute(x, name)
            self._src, self._key = weakref.ref(x), key
        self._served.add(index)
        out = self._outs[index]
        if len(self._served) == len(self.layers):
            self._drop()  # every sibling served: do not keep the outputs alive
        return out

    def _compute(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
        first = self.layers[0]
        result = F.linear(x, self.fused_weight())
        out2d = result.reshape(-1, result.shape[-1])
        pairs = [_adapter_weights(layer, name) for layer in self.layers]
        drop = first.lora_dropout[name]
        p = float(getattr(drop, "p", 0.0)) if isinstance(drop, nn.Dropout) else 0.0
        xd = first._shared_dropout(x, p, drop.training)
        h = F.linear(xd.reshape(-1, xd.shape[-1]), torch.cat([a for a, _ in pairs]))
        b_block = torch.block_diag(*[b for _, b in pairs])
        out2d = torch.addmm(out2d, h, b_block.t(), alpha=first.scaling[name])
        return out2d.view(result.shape).split(self.sizes, dim=-1)


def _row_slices_of(weights: list[torch.Tensor], fused: torch.Tensor) -> bool:
    """True if the weights are consecutive row slices of `fused` (cheap pointer arithmetic)."""
    if any(w.dtype != fused.dtype or w.device != fused.device for w in weights):
        return False
    ptr, row = fused.data_ptr(), fused.stride(0) * fused.element_size()
    for w in weights:
        if w.data_ptr() != ptr or not w.is_contiguous() or w.shape[1:] != fused.shape[1:]:
            return False
        ptr += w.shape[0] * row
    return ptr == fused.data_ptr() + fused.shape[0] * row


def group_sibling_projections(model: nn.Module, siblings=SIBLING_PROJECTIONS) -> int:
    """Group the fused LoRA layers that read one input (see ProjectionGroup), in place.

    A module whose children named by one entry of `siblings` are all fused LoRA layers gets one
    group for them. Returns the number of groups. Call after `fuse_lora_linears`."""
    fused_cls = fused_lora_linear_class()
    count = 0
    for module in model.modules():
        for names in siblings:
            layers = [getattr(module, n, None) for n in names]
            if all(type(layer) is fused_cls for layer in layers):
                group = ProjectionGroup(layers)
                for i, layer in enumerate(layers):
                    layer._proj_group = (group, i)
                count += 1
    return count
