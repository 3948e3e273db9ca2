"""Memory-light loss kernels: the LM head fused with cross-entropy.

With a 32k vocabulary, the logits of a packed micro-batch (8 x 512 tokens) are 8 x 512 x 32768
floats = 512 MiB in fp32, plus the same again for their gradient. The prefix-LM only needs logits
at target positions, and never needs all of them at once:

- `linear_cross_entropy` (portable, exact): the head matmul + log-softmax in chunks of rows. The
  forward keeps only the per-token losses and the log-sum-exp; the backward recomputes each
  chunk's logits and turns them into gradients right away, so peak extra memory is one chunk of
  logits. Matches `F.cross_entropy(hidden @ weight.T, labels, reduction="none")` (logits upcast to
  fp32 as HF does).
- Liger's fused linear cross-entropy (`liger_kernel`, Triton, CUDA only) when installed; see
  `liger_linear_cross_entropy`. `models.prefix_lm.ModelConfig.fused_kernels` chooses.

Liger's RoPE / RMSNorm / SwiGLU patches are per architecture: `LIGER_PATCHES` maps a config's
`model_type` to the Liger function that patches it (`apply_liger_kernels`). Any other architecture
gets no patch and runs the portable path (`has_fused_kernels` is False; `models.prefix_lm.wrap_lm`
says so in one log line).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 2048


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token CE of `hidden @ weight.T (+ bias)` against `labels`, computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        losses = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        safe_labels = labels.clamp(min=0)
        for s in range(0, hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[s:s + chunk_size], weight, bias)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_labels[s:s + chunk_size, None]).squeeze(1)
            lse[s:s + chunk_size] = chunk_lse
            losses[s:s + chunk_size] = chunk_lse - picked
        losses = losses.masked_fill(labels == IGNORE_INDEX, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (need_b and bias is not None) else None
        scale = grad_losses.float().masked_fill(labels == IGNORE_INDEX, 0.0)
        safe_labels = labels.clamp(min=0)
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            h = hidden[s:e]
            # d loss / d logits = softmax - onehot, times the upstream per-token gradient.
            g = torch.exp(_chunk_logits(h, weight, bias) - lse[s:e, None])
            g.scatter_add_(1, safe_labels[s:e, None], torch.full_like(lse[s:e, None], -1.0))
            g.mul_(scale[s:e, None])
            g_lp = g.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:e] = g_lp @ weight
            if grad_w is not None:
                grad_w.add_(g_lp.t().float() @ h.float())
            if grad_b is not None:
                grad_b.add_(g.sum(0))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cross-entropy `[T]` of the logits `hidden [T,H] @ weight[V,H].T` vs `labels [T]`.

    Exact (fp32 softmax), never holds more than `chunk_size x V` logits; label -100 gives loss 0
    and no gradient.
    """
    if hidden.ndim != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants hidden [T,H] and labels [T]; got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size)


def reference_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain path: full logits then F.cross_entropy (fp32), per token. Used as `fused_kernels='none'`."""
    logits = _chunk_logits(hidden, weight, bias)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")


@functools.lru_cache(maxsize=1)
def liger_available() -> bool:
    """True when liger_kernel imports and a CUDA device is present (its kernels are Triton/CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Liger's Triton fused linear cross-entropy, per token (reduction='none')."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    loss = _liger_flce()(weight, hidden, labels, bias)
    return loss.float()


# model_type -> Liger's in-place patch for it (liger_kernel.transformers). All three share one
# signature: (rope, cross_entropy, fused_linear_cross_entropy, rms_norm, swiglu, model).
LIGER_PATCHES = {
    "llama": "apply_liger_kernel_to_llama",      # Llama 2 / 3.x (LlamaForCausalLM)
    "mistral": "apply_liger_kernel_to_mistral",  # Mistral 7B (MistralForCausalLM)
    "qwen2": "apply_liger_kernel_to_qwen2",      # Qwen2 / Qwen2.5 (Qwen2ForCausalLM; biased q/k/v)
}


def has_fused_kernels(model_type: str | None) -> bool:
    """True when Liger has a patch for this architecture (a config's `model_type`)."""
    return model_type in LIGER_PATCHES


def liger_patch_function(model_type: str):
    """Liger's patch function for `model_type` (imports liger_kernel); KeyError names the supported ones."""
    if model_type not in LIGER_PATCHES:
        raise KeyError(f"no Liger kernels for model_type {model_type!r}; supported: {sorted(LIGER_PATCHES)}")
    import liger_kernel.transformers as liger_transformers

    return getattr(liger_transformers, LIGER_PATCHES[model_type])


def apply_liger_kernels(model) -> str:
    """Swap the model's RoPE, RMSNorm and SwiGLU MLP for Liger's Triton kernels, in place, chosen by
    `model.config.model_type` (see `LIGER_PATCHES`); returns the patch function's name.

    Call BEFORE wrapping with PEFT (Liger patches module instances of the HF model; LoRA layers
    then wrap the patched projections as usual). The loss is handled separately by
    `liger_linear_cross_entropy`, so Liger's own CE patches stay off. The RoPE patch is
    module-level in transformers (every model of that architecture built later in the process
    gets it too); it takes HF's cos/sin, so rope scaling (Llama 3.1) and theta are unchanged.
    """
    model_type = getattr(model.config, "model_type", None)
    fn = liger_patch_function(model_type)
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return LIGER_PATCHES[model_type]

