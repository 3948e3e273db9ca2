"""models.lora_autograd: the one-node LoRA group against the same math written with autograd ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.lora_autograd import lora_group_linear

IN, OUTS, RANKS = 24, (32, 8, 8), (4, 4, 6)  # a q/k/v-like group (GQA widths, one odd rank)


def _group(k: int, bias: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(k)
    bases = [torch.randn(o, IN, generator=g, dtype=dtype) / IN**0.5 for o in OUTS[:k]]
    biases = [torch.randn(o, generator=g, dtype=dtype) if bias else None for o in OUTS[:k]]
    a_list = [(torch.randn(r, IN, generator=g, dtype=dtype) / IN**0.5).requires_grad_() for r in RANKS[:k]]
    b_list = [torch.randn(o, r, generator=g, dtype=dtype).requires_grad_() for o, r in zip(OUTS[:k], RANKS[:k])]
    scalings = [2.0, 0.5, 1.5][:k]
    return bases, biases, a_list, b_list, scalings


def _reference(x, bases, biases, a_list, b_list, scalings, p):
    """PEFT's formula with autograd ops, one dropout mask for the group (drawn as the node draws it)."""
    xd = torch.native_dropout(x, p, True)[0] if p > 0 else x
    return [F.linear(x, w, bias) + F.linear(F.linear(xd, a), b) * s
            for w, bias, a, b, s in zip(bases, biases, a_list, b_list, scalings)]


@pytest.mark.parametrize("k,bias,p", [(3, False, 0.0), (3, True, 0.2), (2, False, 0.3), (1, True, 0.0), (1, False, 0.1)])
def test_one_node_equals_autograd_ops_values_and_gradients(k, bias, p):
    bases, biases, a_list, b_list, scalings = _group(k, bias)
    x = torch.randn(2, 5, IN, dtype=torch.float64, requires_grad=True)
    weights = torch.Generator().manual_seed(99)
    probes = [torch.randn(2, 5, o, generator=weights, dtype=torch.float64) for o in OUTS[:k]]
    results = []
    for fn in (_reference, lambda *args: lora_group_linear(*args)):
        torch.manual_seed(5)  # the same mask for both
        outs = fn(x, bases, biases, a_list, b_list, scalings, p)
        loss = sum((o * w).sum() for o, w in zip(outs, probes))
        results.append(([o.detach() for o in outs], torch.autograd.grad(loss, [x, *a_list, *b_list])))
    (outs_r, grads_r), (outs_n, grads_n) = results
    assert len(outs_n) == k and all(o.shape == (2, 5, w.shape[0]) for o, w in zip(outs_n, bases))
    for want, got in zip(outs_r, outs_n):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for want, got in zip(grads_r, grads_n):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if p > 0:  # the mask did something: the same seed without dropout gives other values
        torch.manual_seed(5)
        assert not torch.allclose(lora_group_linear(x, bases, biases, a_list, b_list, scalings, 0.0)[0], outs_n[0])


def test_one_node_with_an_unused_output_and_an_input_without_grad():
    bases, biases, a_list, b_list, scalings = _group(3, False)
    x = torch.randn(7, IN, dtype=torch.float64)  # e.g. frozen embeddings: no input gradient wanted
    torch.manual_seed(1)
    q, _, v = lora_group_linear(x, bases, biases, a_list, b_list, scalings, 0.1)
    grads = torch.autograd.grad(q.sum() + v.sum(), [*a_list, *b_list])
    torch.manual_seed(1)
    q_r, _, v_r = _reference(x, bases, biases, a_list, b_list, scalings, 0.1)
    grads_r = torch.autograd.grad(q_r.sum() + v_r.sum(), [*a_list, *b_list], allow_unused=True)
    assert grads_r[1] is None and grads_r[4] is None  # A_k, B_k: k's output was not used
    for want, got, w in zip(grads_r, grads, [*a_list, *b_list]):
        torch.testing.assert_close(got, torch.zeros_like(w) if want is None else want, atol=1e-12, rtol=1e-12)


def test_one_node_refuses_trainable_base_weights():
    bases, biases, a_list, b_list, scalings = _group(1, False)
    bases[0].requires_grad_()
    with pytest.raises(ValueError, match="frozen"):
        lora_group_linear(torch.randn(3, IN, dtype=torch.float64), bases, biases, a_list, b_list, scalings, 0.0)
