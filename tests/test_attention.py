"""Packed attention backends and the chunked linear+cross-entropy kernel (CPU, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import attention as attn
from models.collate import collate_train
from models.kernels import liger_available, liger_linear_cross_entropy, linear_cross_entropy
from tests.test_model import NUM_IMAGE_TOKENS, build, ex, items, make_tiny_lm_dir


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm_dir(tmp_path_factory.mktemp("tiny_mistral_attn"))


def _hidden(model, batch):
    with torch.no_grad():
        return model.decoder(inputs_embeds=model.embed(batch), **model._decoder_kwargs(batch)).last_hidden_state


def test_packed_attention_never_crosses_examples(lm_dir):
    model = build(lm_dir)
    its = items()
    a = collate_train(its, 0, NUM_IMAGE_TOKENS)
    its[0] = ex("caption", [9, 9, 9], [10, 11, 12, 13], cond=7, seed=99)  # same length, other tokens/image
    b = collate_train(its, 0, NUM_IMAGE_TOKENS)
    ha, hb = _hidden(model, a), _hidden(model, b)
    first_end = int(a["cu_seqlens"][1])
    assert not torch.allclose(ha[0, :first_end], hb[0, :first_end])  # example 1 did change ...
    torch.testing.assert_close(ha[0, first_end:], hb[0, first_end:], atol=1e-6, rtol=0)  # ... nothing else


def test_hf_builds_no_dense_mask_for_packed_backends(lm_dir):
    from transformers.masking_utils import create_causal_mask

    model = build(lm_dir)
    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    emb = model.embed(batch)
    mask = create_causal_mask(config=model.base_lm.config, inputs_embeds=emb, attention_mask=None, cache=None,
                              position_ids=batch["position_ids"])
    assert mask is None
    with model.stock_attention("sdpa"):  # what stock sdpa would have done: a dense [L, L] mask
        dense = create_causal_mask(config=model.base_lm.config, inputs_embeds=emb, attention_mask=None,
                                   cache=None, position_ids=batch["position_ids"])
    assert dense is not None and dense.shape[-1] == emb.shape[1]


def _qkv(L=24, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, L, d, generator=g) for h in (hq, hkv, hkv)]


def _reference(q, k, v, cu, window=None):
    """Each document on its own, through plain causal attention with repeated KV heads."""
    outs = []
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = e - s
        i = torch.arange(n)
        m = i[None, :] <= i[:, None]
        if window is not None:
            m &= (i[:, None] - i[None, :]) < window
        o = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e].repeat_interleave(rep, 1),
                                           v[:, :, s:e].repeat_interleave(rep, 1), attn_mask=m)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_sdpa_matches_per_document_attention(window):
    q, k, v = _qkv()
    cu = torch.tensor([0, 5, 6, 15, 24], dtype=torch.int32)
    out, _ = attn.packed_sdpa_attention(None, q, k, v, None, scaling=None, sliding_window=window,
                                        cu_seq_lens_q=cu, max_length_q=9)
    torch.testing.assert_close(out, _reference(q, k, v, cu, window), atol=1e-5, rtol=1e-5)


def test_flex_matches_packed_sdpa_on_cpu():
    """flex_attention runs on CPU too (unfused fallback): slow per token, but checks the BlockMask logic."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _qkv(L=128, d=16)
    cu = torch.tensor([0, 40, 41, 100, 128], dtype=torch.int32)
    try:
        out, _ = attn.flex_attention_packed(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu)
    except Exception as e:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"flex_attention does not run on this CPU: {e!r}")
    torch.testing.assert_close(out, _reference(q, k, v, cu), atol=1e-4, rtol=1e-4)


def test_auto_resolution_and_errors():
    assert attn.resolve_attn_implementation("auto", "cpu") == "packed_sdpa"
    assert attn.resolve_attn_implementation("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="choices"):
        attn.resolve_attn_implementation("flash3000", "cpu")
    with pytest.raises(RuntimeError, match="not available"):
        attn.resolve_attn_implementation("varlen", "cpu")


def test_packed_backend_refuses_kv_cache():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="KV cache"):
        attn.packed_sdpa_attention(None, q[:, :, -1:], k, v, None)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_linear_cross_entropy_is_exact(chunk):
    g = torch.Generator().manual_seed(0)
    T, H, V = 23, 16, 50
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[[0, 5, 6]] = -100
    upstream = torch.rand(T, generator=g, dtype=torch.float64)

    ours = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-6)
    assert (ours[[0, 5, 6]] == 0).all()
    g_ours = torch.autograd.grad((ours.double() * upstream).sum(), (hidden, weight))
    g_ref = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_chunked_cross_entropy_frozen_head_and_empty_input():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen LM head: no weight gradient is computed
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, -100, 4, 10]), chunk_size=2)
    loss.sum().backward()
    assert hidden.grad is not None and hidden.grad[2].abs().sum() == 0
    empty = linear_cross_entropy(torch.zeros(0, 8, requires_grad=True), weight, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


@pytest.mark.skipif(not liger_available(), reason="liger_kernel needs CUDA and is not installed here")
def test_liger_matches_chunked():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=g)
    weight = torch.randn(1000, 64, device="cuda", generator=g)
    labels = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    labels[:10] = -100
    torch.testing.assert_close(liger_linear_cross_entropy(hidden, weight, labels),
                               linear_cross_entropy(hidden, weight, labels), atol=1e-3, rtol=1e-3)
