"""LoRA projections that read one input, forward and backward as ONE autograd node.

For k projections of the same input x (q/k/v, gate/up, or a single one), each with a frozen base
weight W_i (and optional bias) and a LoRA pair A_i [r_i, in], B_i [out_i, r_i] with scale s_i:

    xd, mask = dropout(x)                     # one mask for the group, PEFT's Bernoulli(1-p) / (1-p)
    low      = xd @ [A_1; ...; A_k]^T         # one low-rank GEMM
    out_i    = x @ W_i^T (+ b_i);  out_i += s_i * low_i @ B_i^T      # in place, in the GEMM epilogue

Backward, written out instead of left to autograd, so that the input gradient is built in ONE
buffer by accumulating GEMMs (cuBLAS beta=1) rather than by k + 2 separate [tokens, in] tensors
summed by autograd's gradient accumulation and a dropout-backward pass:

    g_low_i  = s_i * g_i @ B_i                # [tokens, r_i]
    dB_i     = s_i * g_i^T @ low_i
    dA       = [g_low_1 | ... | g_low_k]^T @ xd            # one GEMM, split per projection
    dx       = mask / (1-p) * ([g_low_1 | ...] @ [A_1; ...])   # the dropout's backward kernel
    dx      += g_i @ W_i  for every i                      # addmm_ into the same buffer (beta = 1)

The math is PEFT's; only float summation order differs (tests compare against the autograd
version in fp32). Base weights must be frozen: no gradient is computed for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, scalings: tuple, bases: tuple, biases: tuple, *lora):
        k = len(bases)
        a_list, b_list = lora[:k], lora[k:]
        x2d = x.reshape(-1, x.shape[-1])
        if p > 0.0:
            xd, mask = torch.native_dropout(x2d, p, True)
        else:
            xd, mask = x2d, None
        a_cat = torch.cat(a_list) if k > 1 else a_list[0]
        low = torch.mm(xd, a_cat.t())
        ranks = [a.shape[0] for a in a_list]
        lows = low.split(ranks, dim=1)
        outs = []
        for w, bias, b, low_i, s in zip(bases, biases, b_list, lows, scalings):
            out = F.linear(x2d, w, bias)
            out.addmm_(low_i, b.t(), alpha=s)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.p, ctx.scalings, ctx.ranks, ctx.k = p, scalings, ranks, k
        ctx.x_shape = x.shape
        ctx.save_for_backward(xd, mask, low, a_cat, *b_list, *bases)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        xd, mask, low, a_cat, *rest = ctx.saved_tensors
        k, p, scalings = ctx.k, ctx.p, ctx.scalings
        b_list, bases = rest[:k], rest[k:]
        lows = low.split(ctx.ranks, dim=1)
        tokens = xd.shape[0]
        grads = [None if g is None else g.reshape(tokens, -1) for g in grads]
        g_lows, grad_b = [], []
        for g, b, low_i, s in zip(grads, b_list, lows, scalings):
            if g is None:  # an output nobody used
                g_lows.append(low_i.new_zeros(low_i.shape))
                grad_b.append(torch.zeros_like(b))
                continue
            g_lows.append(torch.mm(g, b).mul_(s))
            grad_b.append(torch.mm(g.t(), low_i).mul_(s))
        g_low = torch.cat(g_lows, dim=1) if k > 1 else g_lows[0]
        grad_a = list(torch.mm(g_low.t(), xd).split(ctx.ranks, dim=0))
        grad_x = None
        if ctx.needs_input_grad[0]:
            # The LoRA part first, masked by the dropout's own backward kernel (bool mask and bf16 in
            # one vectorised pass; a mixed-dtype addcmul_ is not), then every base GEMM adds into it.
            grad_x = torch.mm(g_low, a_cat)
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))
            for g, w in zip(grads, bases):
                if g is not None:
                    grad_x.addmm_(g, w)
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, None, None, None, *grad_a, *grad_b)


def lora_group_linear(x: torch.Tensor, bases: list[torch.Tensor], biases: list[torch.Tensor | None],
                      a_list: list[torch.Tensor], b_list: list[torch.Tensor], scalings: list[float],
                      p: float) -> tuple[torch.Tensor, ...]:
    """`base_i(x) + s_i * dropout(x) @ A_i^T @ B_i^T` for every i, one shared dropout mask (p > 0:
    training), one autograd node. Returns one output per projection, shaped like x but for the
    last dimension."""
    if not (len(bases) == len(biases) == len(a_list) == len(b_list) == len(scalings) >= 1):
        raise ValueError("lora_group_linear: one base weight, bias, A, B and scale per projection")
    if any(w.requires_grad for w in bases) or any(b is not None and b.requires_grad for b in biases):
        raise ValueError("lora_group_linear: the base weights must be frozen (no gradient is computed for them)")
    return _LoraGroup.apply(x, float(p), tuple(float(s) for s in scalings), tuple(bases), tuple(biases),
                            *a_list, *b_list)
