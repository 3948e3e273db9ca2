"""Packed attention backends and the chunked linear+cross-entropy kernel (CPU, tiny shapes), and
the choice of kernels and attention per architecture (Liger patch by model_type, portable path)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from models import attention as attn
from models import kernels, prefix_lm
from models.collate import collate_train
from models.kernels import liger_available, liger_linear_cross_entropy, linear_cross_entropy
from tests.test_model import LATENT_DIM, NUM_IMAGE_TOKENS, build, ex, items, make_tiny_lm_dir, perturb_trainables


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


# ---------------------------------------------------------------------------------------------
# Kernels and attention per architecture (models.kernels.LIGER_PATCHES, models.prefix_lm.wrap_lm).
# Liger is CUDA-only and not installed here: a stand-in module records which patch is applied.

PORTABLE_LINE = "no fused kernels for this architecture; using the portable path"


def _tiny_hf_lm(arch: str):
    """An in-memory tiny random HF causal LM of `arch` (vocab 32: the ids `items()` uses)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from tiny_models.lm import TINY_ARCHS

    if arch == "gpt_neox":  # an architecture Liger has no patch for here (other module names, partial RoPE)
        config = GPTNeoXConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    else:
        config = TINY_ARCHS[arch].config(32, hidden_size=32)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _model_cfg(arch: str, **over) -> prefix_lm.ModelConfig:
    targets = ["query_key_value", "dense"] if arch == "gpt_neox" else list(prefix_lm.DEFAULT_LORA_TARGETS)
    return prefix_lm.ModelConfig(num_image_tokens=NUM_IMAGE_TOKENS, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                 lora_target_modules=targets, **over)


@pytest.fixture
def fake_liger(monkeypatch):
    """`liger_kernel.transformers` with recording patch functions (Liger's signature), and a "CUDA
    device with Liger" for the kernel choice. Returns the list of (function name, kwargs) calls."""
    calls = []
    package, sub = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    for arch in ("llama", "mistral", "qwen2", "gemma"):
        def patch(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                  model=None, _name=f"apply_liger_kernel_to_{arch}"):
            calls.append((_name, dict(rope=rope, cross_entropy=cross_entropy, rms_norm=rms_norm, swiglu=swiglu,
                                      fused_linear_cross_entropy=fused_linear_cross_entropy, model=model)))
        setattr(sub, f"apply_liger_kernel_to_{arch}", patch)
    package.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    real = prefix_lm.resolve_fused_kernels
    monkeypatch.setattr(prefix_lm, "resolve_fused_kernels",
                        lambda name, device, model_type=None, compiled=False: real(name, torch.device("cuda"), model_type,
                                                                                   compiled))
    return calls


def test_fused_kernel_choice_per_architecture(monkeypatch):
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for arch in ("llama", "mistral", "qwen2", None):  # None: a caller that does not say (assumed supported)
        assert prefix_lm.resolve_fused_kernels("auto", cuda, arch) == "liger"
        assert prefix_lm.resolve_fused_kernels("auto", cpu, arch) == "chunked"
    assert prefix_lm.resolve_fused_kernels("auto", cuda, "gpt_neox") == "chunked"
    assert prefix_lm.resolve_fused_kernels("none", cuda, "gpt_neox") == "none"
    with pytest.raises(ValueError, match="no Liger kernels for model_type 'gpt_neox'.*use 'auto' or 'chunked'"):
        prefix_lm.resolve_fused_kernels("liger", cuda, "gpt_neox")
    assert kernels.LIGER_PATCHES == {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                                     "qwen2": "apply_liger_kernel_to_qwen2"}
    with pytest.raises(KeyError, match="supported"):
        kernels.liger_patch_function("gemma")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_wrap_lm_applies_the_architectures_liger_patch_before_peft(arch, fake_liger, caplog):
    lm = _tiny_hf_lm(arch)
    with caplog.at_level(logging.INFO, logger="models.prefix_lm"):
        model = prefix_lm.wrap_lm(lm, _model_cfg(arch), LATENT_DIM, device="cpu")
    assert [name for name, _ in fake_liger] == [f"apply_liger_kernel_to_{arch}"]
    kwargs = fake_liger[0][1]
    assert kwargs["model"] is lm and kwargs["model"] is model.base_lm  # the HF model itself, not the PEFT wrapper
    assert kwargs["rope"] and kwargs["rms_norm"] and kwargs["swiglu"]
    assert not kwargs["cross_entropy"] and not kwargs["fused_linear_cross_entropy"]  # the loss is ours
    assert model.loss_impl == "liger"
    assert not [r for r in caplog.records if PORTABLE_LINE in r.getMessage()]


def test_an_unknown_architecture_takes_the_portable_path(fake_liger, caplog):
    """GPT-NeoX: no Liger patch, chunked CE, packed_sdpa (also where CUDA would pick another backend),
    one log line; and packed_sdpa really reaches its attention (packed loss == padded loss)."""
    with caplog.at_level(logging.INFO, logger="models.prefix_lm"):
        model = prefix_lm.wrap_lm(_tiny_hf_lm("gpt_neox"), _model_cfg("gpt_neox"), LATENT_DIM, device="cpu")
    lines = [r.getMessage() for r in caplog.records if PORTABLE_LINE in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"gpt_neox: {PORTABLE_LINE}"), lines
    assert fake_liger == [] and model.loss_impl == "chunked"
    assert model.attn_implementation == attn.hf_attn_name("packed_sdpa")
    perturb_trainables(model)
    model.eval()
    with torch.no_grad():
        packed = model(collate_train(items(), 0, NUM_IMAGE_TOKENS, packed=True))
        padded = model(collate_train(items(), 0, NUM_IMAGE_TOKENS, packed=False))
    torch.testing.assert_close(packed.token_losses, padded.token_losses, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no Liger kernels for model_type 'gpt_neox'"):
        prefix_lm.wrap_lm(_tiny_hf_lm("gpt_neox"), _model_cfg("gpt_neox", fused_kernels="liger"), LATENT_DIM,
                          device="cpu")


def test_auto_attention_is_packed_sdpa_on_the_portable_path():
    assert attn.resolve_attn_implementation("auto", "cuda", portable=True) == "packed_sdpa"
    assert attn.resolve_attn_implementation("sdpa", "cpu", portable=True) == "sdpa"  # an explicit choice stays


def test_packed_backends_refuse_a_model_outside_the_attention_interface():
    outside = types.SimpleNamespace(_supports_attention_backend=False, config=types.SimpleNamespace(model_type="bloom"))
    with pytest.raises(ValueError, match="bloom .*AttentionInterface.*--no-packed --attn-implementation sdpa"):
        attn.check_model_supported(outside, "packed_sdpa")
    attn.check_model_supported(outside, "sdpa")  # stock attention: the model's own
    for arch in ("llama", "qwen2", "gpt_neox"):
        attn.check_model_supported(_tiny_hf_lm(arch), "varlen")


def test_attention_the_backends_do_not_implement_is_an_error():
    """Soft-capping, sinks, position bias, non-causal attention, or dropout from a kernel without it:
    a clear error, never silently different attention."""
    q, k, v = _qkv()
    cu = torch.tensor([0, 5, 24], dtype=torch.int32)
    for kw in ({"softcap": 50.0}, {"s_aux": torch.zeros(4)}, {"position_bias": torch.zeros(1)}):
        with pytest.raises(NotImplementedError, match=f"{next(iter(kw))}.*'eager'"):
            attn.packed_sdpa_attention(None, q, k, v, None, cu_seq_lens_q=cu, **kw)
    with pytest.raises(NotImplementedError, match="non-causal"):
        attn.packed_sdpa_attention(types.SimpleNamespace(is_causal=False), q, k, v, None, cu_seq_lens_q=cu)
    attn.packed_sdpa_attention(None, q, k, v, None, cu_seq_lens_q=cu, softcap=None, position_ids=None)  # fine
    for fn in (attn.varlen_attention, attn.flex_attention_packed):
        with pytest.raises(NotImplementedError, match="no attention dropout.*'packed_sdpa'"):
            fn(None, q, k, v, None, dropout=0.1, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=19,
               max_length_k=19)


@pytest.mark.parametrize("signature", ["torch-2.11", "torch-2.12+"])
def test_varlen_hands_grouped_kv_heads_to_the_kernel_as_they_are(monkeypatch, signature):
    """Grouped-query attention: K/V keep their own head count (no repeat to the query's); torch 2.11's
    varlen_attn has no enable_gqa flag, later ones get it set. The kernel here is a CPU stand-in that
    attends per document with each query head's K/V group."""
    seen = {}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None, **kw):
        seen.update(kv_heads=k.shape[1], q_heads=q.shape[1], **kw)
        qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, L, D]
        return _reference(qh, kh, vh, cu_q)[0]  # repeats each K/V head for its query group

    if signature == "torch-2.11":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=None, scale=None, window_size=None):
            return kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=None, scale=None, window_size=None,
                 enable_gqa=False):
            return kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa=enable_gqa)
    monkeypatch.setattr(attn, "_varlen_fn", lambda: fake)
    attn._varlen_params.cache_clear()
    try:
        q, k, v = _qkv()
        cu = torch.tensor([0, 5, 6, 15, 24], dtype=torch.int32)
        out, _ = attn.varlen_attention(None, q, k, v, None, scaling=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                       max_length_q=9, max_length_k=9)
    finally:
        attn._varlen_params.cache_clear()
    assert seen["kv_heads"] == k.shape[1] < seen["q_heads"] == q.shape[1]
    assert seen.get("enable_gqa", True) is True
    torch.testing.assert_close(out, _reference(q, k, v, cu), atol=1e-5, rtol=1e-5)
