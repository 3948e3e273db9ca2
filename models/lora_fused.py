"""A leaner forward for PEFT's LoRA `Linear` layers: same parameters, same math, fewer kernels.

PEFT computes `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`, which on a GPU is two
GEMMs plus a dropout kernel, a `mul` and an `add` over the full `[tokens, out_features]` output
(and their backward twins), per adapted module. Here:

    out = base(x)                                               # frozen bf16 GEMM
    out.addmm_(dropout(x) @ A^T, B^T, alpha=scaling)            # the add + scale ride in the GEMM epilogue

and the dropout is computed once per distinct input tensor: q/k/v read the same normed hidden
states, gate/up too, so one mask (and one saved dropped tensor) serves them all instead of three or
two. Each module still sees an independent-looking Bernoulli(1 - p) mask with 1/(1-p) scaling, i.e.
the same marginal distribution as PEFT; only the masks of q/k/v (and of gate/up) are now equal.
With dropout 0 (or in eval mode) the result equals PEFT's forward up to float reassociation.

Sibling projections that read one input (q/k/v, gate/up: `SIBLINGS`) also share their first LoRA
GEMM while training with packed adapters (models.flat_lora): the first sibling called computes
`dropout(x) @ [A_q; A_k; A_v]^T` for the group and each takes its columns. In backward that is one
gradient GEMM into the dropped input and one read of it for the A gradients, instead of one each per
sibling plus the sums of their gradients.

Eager training with packed adapters goes one step further (`one_node`, the default): each sibling
group (and each single projection) is ONE autograd node, models.lora_autograd, whose hand-written
backward builds the input gradient in a single buffer (accumulating GEMMs, the dropout mask applied
in the same pass) instead of autograd's separate per-projection gradients and their sums. The
per-layer ops above stay for compiled layers, unpacked adapters (ZeRO-3, FSDP2) and inference.

The layers keep their class hierarchy (a subclass of `peft.tuners.lora.Linear` is swapped in as
the instance's `__class__`) and their parameters, so `state_dict`, `save_pretrained`, merging and
loading stay standard PEFT. Anything the fast path does not cover (merged / disabled adapters,
mixed-adapter batches, DoRA and other variants, PEFT's `lora_bias`, adapter dtype != output dtype)
falls back to PEFT's own forward. A biased base projection (Qwen2's q/k/v) keeps its bias in
`base(x)`, added once, exactly as in PEFT.

    n = fuse_lora_linears(peft_model)   # in place; returns how many layers were switched
    shared_dropout_cache(peft_model).clear()   # after a forward, to drop the cached tensors
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear

from models.lora_autograd import lora_group_linear


class SharedDropout:
    """Dropout that returns the same dropped tensor for repeated calls on the same input tensor.

    Keyed on the identity (a weak reference) and version of the input and on `p`, so a new
    forward, an in-place change of the input, or a recompute under activation checkpointing (new
    tensors, RNG state restored by torch.utils.checkpoint) draws a fresh mask. Only the latest
    input is remembered: q/k/v (and gate/up) are called back to back on the same tensor. The
    same object keeps the latest sibling group's low-rank product (`group_low_rank`, compiled layers)
    and outputs (`group_outputs`, the eager one-node groups).

    Inside a compiled decoder layer (models.layer_compile) the cache is a plain attribute the
    compiler can trace (no weak reference, no version counter); the layer clears it on entry and
    exit, so nothing traced outlives the layer's graph.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._src: weakref.ref | None = None
        self._key: tuple | None = None
        self._out: torch.Tensor | None = None
        self._traced: tuple | None = None
        self._low_rank: tuple | None = None
        self._group: tuple | None = None

    def group_outputs(self, x: torch.Tensor, first_a: torch.Tensor,
                      compute: Callable[[], tuple | None]) -> tuple | None:
        """The latest sibling group's outputs on `x` (models.lora_autograd), computed by the first
        sibling called; keyed on the input (identity and version) and the group's first A view."""
        cached = self._group
        if cached is not None and cached[0]() is x and cached[1] == x._version and cached[2] is first_a:
            return cached[3]
        outs = compute()
        self._group = (weakref.ref(x), x._version, first_a, outs)
        return outs

    def group_low_rank(self, xd: torch.Tensor, first_a: torch.Tensor,
                       weights: Callable[[], list[torch.Tensor] | None]) -> tuple | None:
        """`xd @ [A_1; ...; A_k]^T` split per sibling (column views), computed once per dropped input
        and group: keyed on tensors (the dropped input, the group's first A), which a compiled graph
        can compare. On a miss `weights()` gives the group's A matrices in order, or None when the
        group cannot share the GEMM (then so does this)."""
        cached = self._low_rank
        if cached is not None and cached[0] is xd and cached[1] is first_a:
            return cached[2]
        mats = weights()
        if mats is None:
            return None
        low_rank = F.linear(xd.reshape(-1, xd.shape[-1]), torch.cat(mats))
        pieces = low_rank.split([w.shape[0] for w in mats], dim=-1)
        self._low_rank = (xd, first_a, pieces)
        return pieces

    def __call__(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        if p == 0.0 or not training:
            return x
        if torch.compiler.is_compiling():
            if self._traced is not None and self._traced[0] is x and self._traced[1] == p:
                return self._traced[2]
            out = F.dropout(x, p, training=True)
            self._traced = (x, p, out)
            return out
        key = (x._version, p, torch.is_grad_enabled())
        if self._src is not None and self._src() is x and self._key == key:
            return self._out
        out = F.dropout(x, p, training=True)
        self._src, self._key, self._out = weakref.ref(x), key, out
        return out


def _lora_linear_class():
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
                if args or kwargs or not _fast_path_ok(self):
                    if getattr(self, "_flat_lora_owner", False) and torch.is_grad_enabled():
                        raise RuntimeError("a LoRA layer packed by models.flat_lora must run the fused "
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
    if any(layer.lora_bias.values()):  # PEFT's lora_bias=True: lora_B has a bias of its own
        return False
    return isinstance(layer.base_layer, nn.Linear)


def _dropout_p(drop: nn.Module) -> float:
    """A LoRA layer's dropout rate (PEFT puts an Identity where the rate is 0)."""
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


def _fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    # models.flat_lora: differentiable views of the one flat trainable tensor (None: PEFT's own,
    # e.g. generation, where the weights are views of the same storage anyway).
    flat = getattr(layer, "_flat_lora", None)
    if flat is not None and _one_node_ok(layer, x):
        outs = _group_outputs(layer, x)
        if outs is not None:
            return outs[layer._lora_sibling_index if len(outs) > 1 else 0]
    # The base layer's own bias (Qwen2's q/k/v have one) is added here, once, by base_layer(x);
    # the LoRA term below is bias-free (lora_B has no bias on this path), as in PEFT.
    # A 2-D call, so that `out2d` is the GEMM's own output rather than a view of it: an in-place add
    # to a view makes autograd copy the whole gradient in backward (CopySlices).
    out2d = layer.base_layer(x.reshape(-1, x.shape[-1]))
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
        p = _dropout_p(drop)
        xd = layer._shared_dropout(x, p, drop.training)
        low_rank = _grouped_low_rank(layer, name, xd, p) if flat is not None else None
        if low_rank is None:
            low_rank = F.linear(xd.reshape(-1, xd.shape[-1]), a)
        if torch.compiler.is_compiling():
            # Compiled layer: a plain add, which the compiler fuses into the elementwise kernel that
            # reads this output next (RoPE, SwiGLU, the residual add).
            out2d = out2d + F.linear(low_rank, b) * layer.scaling[name]
        else:
            # (xd @ A^T) @ B^T * scaling + out, the scale and the add inside the second GEMM, in
            # place: an out-of-place addmm first copies `out` into a new tensor. Nothing saves the base
            # GEMM's output (the frozen base's backward needs only its weight), so the in-place add is safe.
            out2d = out2d.addmm_(low_rank, b.t(), alpha=layer.scaling[name])
    return out2d.view(*x.shape[:-1], out2d.shape[-1])


def _one_node_ok(layer, x: torch.Tensor) -> bool:
    """Train this (eager) layer and its siblings through models.lora_autograd's one-node forward and
    backward? Compiled layers keep the autograd ops (the compiler writes their backward)."""
    return (layer._lora_one_node and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and len(layer.active_adapters) == 1 and not torch.is_autocast_enabled(x.device.type))


def _group_outputs(layer, x: torch.Tensor) -> tuple | None:
    """The outputs of this layer's sibling group (or of the layer alone) from one
    `lora_group_linear` node, computed by the first sibling called on `x` and handed to the others;
    None when the group cannot run that way (then each layer takes the per-layer path)."""
    name = layer.active_adapters[0]
    group = getattr(layer, "_lora_siblings", ()) or (layer,)
    first = group[0]._flat_lora
    if first is None or name not in first:
        return None
    return layer._shared_dropout.group_outputs(x, first[name][0], lambda: _run_group(group, layer, name, x))


def _run_group(group: tuple, layer, name: str, x: torch.Tensor) -> tuple | None:
    p = _dropout_p(layer.lora_dropout[name])
    a_list = _group_weights(group, layer, name, x, p)
    if a_list is None:
        return None
    for sibling in group:  # beyond _group_weights' checks: the node computes no base-weight gradient
        b, base = sibling._flat_lora[name][1], sibling.base_layer
        if (b.dtype != x.dtype or base.weight.dtype != x.dtype or base.weight.requires_grad
                or (base.bias is not None and base.bias.requires_grad)):
            return None
    training = layer.lora_dropout[name].training
    return lora_group_linear(
        x, [s.base_layer.weight for s in group], [s.base_layer.bias for s in group],
        a_list, [s._flat_lora[name][1] for s in group],
        [s.scaling[name] for s in group], p if training else 0.0)


def _grouped_low_rank(layer, name: str, xd: torch.Tensor, p: float) -> torch.Tensor | None:
    """This layer's `xd @ A^T` from its sibling group's one GEMM; None when the group cannot share it."""
    group = getattr(layer, "_lora_siblings", ())
    first = getattr(group[0], "_flat_lora", None) if group else None
    if len(group) < 2 or len(layer.active_adapters) != 1 or first is None or name not in first:
        return None
    pieces = layer._shared_dropout.group_low_rank(xd, first[name][0], lambda: _group_weights(group, layer, name, xd, p))
    return None if pieces is None else pieces[layer._lora_sibling_index]


def _group_weights(group: tuple, layer, name: str, xd: torch.Tensor, p: float) -> list[torch.Tensor] | None:
    """The siblings' packed A matrices, or None if one of them differs from `layer` (another adapter,
    dropout, dtype or forward path, or no packed weights)."""
    training = layer.lora_dropout[name].training
    weights = []
    for sibling in group:
        flat = getattr(sibling, "_flat_lora", None)
        drop = sibling.lora_dropout[name] if name in sibling.lora_dropout else None
        if (flat is None or drop is None or name not in flat or sibling.active_adapters != layer.active_adapters
                or not _fast_path_ok(sibling) or _dropout_p(drop) != p or drop.training != training
                or flat[name][0].dtype != xd.dtype):
            return None
        weights.append(flat[name][0])
    return weights


# Projections of one block that HF models call on the same input tensor (Mistral, Llama, Qwen2).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _link_siblings(model: nn.Module, fused: type) -> None:
    for parent in model.modules():
        for names in SIBLINGS:
            group = tuple(getattr(parent, n) for n in names if type(getattr(parent, n, None)) is fused)
            for i, layer in enumerate(group):
                layer._lora_siblings = group if len(group) > 1 else ()  # a tuple: not registered as submodules
                layer._lora_sibling_index = i


def fuse_lora_linears(model: nn.Module, one_node: bool = True) -> int:
    """Switch every plain PEFT LoRA `Linear` in `model` to the fused forward, in place.

    `one_node`: train layers with packed adapters (models.flat_lora) through one autograd node per
    sibling group (models.lora_autograd) rather than the per-layer autograd ops (the reference).

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
            module._lora_one_node = one_node
            count += 1
    if count:
        model._lora_shared_dropout = cache
        _link_siblings(model, fused)
    return count


def shared_dropout_cache(model: nn.Module) -> SharedDropout | None:
    """The `SharedDropout` that `fuse_lora_linears` attached to `model` (None if not fused)."""
    return getattr(model, "_lora_shared_dropout", None)
