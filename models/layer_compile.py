"""`--compile`: `torch.compile` of each decoder layer.

The step is GPU-bound; what is left between the GEMMs and the attention kernel is elementwise work
(RMSNorm, RoPE, SwiGLU, the LoRA dropout, residual adds and the gradient sums of inputs read by
several projections). The compiler fuses it into few kernels. One compiled graph serves every layer
(the layers differ only in their weights, which are graph inputs); the row length and the packing
boundaries change from step to step, so after the first new length the graph is recompiled once with
a symbolic length and then reused.

The eager path stays (`--compile off`, and CPU by default): same modules, same parameters and
adapter files. Liger's Triton kernels are not used inside compiled layers (the compiler generates
its own for the same ops), so `--fused-kernels auto` picks the chunked loss when compiling.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.lora_fused import shared_dropout_cache

COMPILE_CHOICES = ("auto", "on", "off")


def resolve_compile(name: str, device: torch.device) -> bool:
    """`--compile`: auto = on for CUDA, off elsewhere (CPU compiles slowly and gains little)."""
    if name not in COMPILE_CHOICES:
        raise ValueError(f"compile={name!r}; choices: {', '.join(COMPILE_CHOICES)}")
    return name == "on" or (name == "auto" and device.type == "cuda")


# Graph variants one layer may need: first row length (static), then symbolic lengths; the same before
# and after the engine packs the LoRA weights (models.flat_lora); with and without grad (validation).
RECOMPILE_LIMIT = 32


def compile_decoder_layers(lm: nn.Module) -> int:
    """Compile every decoder layer of `lm` in place (`nn.Module.compile`); returns how many.

    The fused LoRA layers' shared dropout cache is cleared on the layer's entry and exit, inside the
    compiled graph: q/k/v (and gate/up) then share one mask and one saved dropped input, as in eager.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    cache = shared_dropout_cache(lm)
    clear = _ClearCache(cache) if cache is not None else None  # one hook object: the layers share one graph
    layers = lm.get_decoder().layers  # PEFT's wrapper hands get_decoder on to the base model
    for layer in layers:
        if clear is not None:
            layer.register_forward_pre_hook(clear)
            layer.register_forward_hook(clear)
        layer.compile()
    return len(layers)


class _ClearCache:
    """A forward (pre-)hook that empties the shared dropout cache."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def __call__(self, *_) -> None:
        self.cache.clear()
