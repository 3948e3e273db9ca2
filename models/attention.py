"""Packed ("varlen") attention backends for HF transformers models, chosen by one config value.

A packed micro-batch is one row of several examples; `cu_seqlens` (int32 [n+1]) marks their
boundaries. Each backend here is registered with transformers' `AttentionInterface` under its own
name, and `PrefixLM` passes `cu_seq_lens_q/k` + `max_length_q/k` as keyword arguments to the
decoder, which forwards them to every attention call (transformers 5.x `FlashAttentionKwargs`).

Why custom names instead of "sdpa"/"flex_attention": the names are NOT registered in
`ALL_MASK_ATTENTION_FUNCTIONS`, so `create_causal_mask` exits early and returns no mask. For the
stock names HF would detect packing from `position_ids` (a host sync) and materialise a dense
[L, L] block-diagonal mask. Here the kernels get the boundaries directly.

| name (ModelConfig.attn_implementation) | kernel                                                      | device |
|----------------------------------------|-------------------------------------------------------------|--------|
| `packed_sdpa`                          | SDPA with a block-diagonal causal mask (exact reference)    | any    |
| `varlen`                               | `torch.nn.attention.varlen.varlen_attn` (FlashAttention)    | CUDA, torch >= 2.11 |
| `flex`                                 | `flex_attention` + document `BlockMask` (compiled)          | CUDA (CPU works, slowly) |
| `flash_attn`                           | `flash_attn_varlen_func` of flash-attn 4 (`flash_attn.cute`) or 2 | CUDA |
| `sdpa` / `eager`                       | stock HF (dense mask built by HF for packed rows)           | any    |

`auto` resolves with `resolve_attn_implementation`: CUDA -> varlen if available, else flash_attn,
else flex; CPU -> packed_sdpa. An architecture without fused kernels (`models.kernels.LIGER_PATCHES`:
llama, mistral, qwen2) takes the portable path: `auto` -> packed_sdpa on every device.

Which models they reach: a backend registered here is called by every model whose attention goes
through `ALL_ATTENTION_FUNCTIONS` (`PreTrainedModel._supports_attention_backend`; Llama, Qwen2,
Mistral, GPT-NeoX, Phi, ...), with the decoder's extra keyword arguments (`cu_seq_lens_q`, ...).
`check_model_supported` refuses the packed backends for any other model (they would never be
called). The kernels implement causal softmax attention with an optional sliding window; an
architecture that asks for more (logit soft-capping, attention sinks, a position bias, non-causal
attention) or dropout from a kernel without it gets a NotImplementedError, never a silently
different attention.

Without `cu_seq_lens_q` (padded training rows) the packed backends run plain causal SDPA, which
is exact for right-padded rows. They do not support a KV cache: `PrefixLM.generate` switches the
model to stock `sdpa` for generation.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED_BACKENDS = ("packed_sdpa", "varlen", "flex", "flash_attn")
STOCK_BACKENDS = ("sdpa", "eager")
ATTN_CHOICES = ("auto",) + PACKED_BACKENDS + STOCK_BACKENDS
_REGISTERED_PREFIX = "prefix_lm_"  # the name under which a backend is registered with HF


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------

def _varlen_fn() -> Callable | None:
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    return getattr(varlen, "varlen_attn", None)


def _flash_attn_fn() -> Callable | None:
    try:  # flash-attn 4 (Hopper/Blackwell, CuTe DSL)
        from flash_attn.cute import flash_attn_varlen_func

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:  # flash-attn 2
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except ImportError:
        return None


def backend_available(name: str, device: torch.device | str | None = None) -> bool:
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if name in ("packed_sdpa",) + STOCK_BACKENDS:
        return True
    if name == "varlen":
        return cuda and _varlen_fn() is not None
    if name == "flash_attn":
        return cuda and _flash_attn_fn() is not None
    if name == "flex":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"unknown attention implementation {name!r}; choices: {ATTN_CHOICES}")


def resolve_attn_implementation(name: str, device: torch.device | str | None = None, portable: bool = False) -> str:
    """Map "auto" to the fastest backend that works here (`portable`: packed_sdpa, the exact
    reference, for architectures without fused kernels); check that an explicit one does."""
    if name not in ATTN_CHOICES:
        raise ValueError(f"attn_implementation={name!r}; choices: {ATTN_CHOICES}")
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if name == "auto" and portable:
        return "packed_sdpa"
    if name == "auto":
        order = ("varlen", "flash_attn", "flex") if cuda else ("packed_sdpa",)
        return next(n for n in order + ("packed_sdpa",) if backend_available(n, device))
    if not backend_available(name, device):
        raise RuntimeError(f"attn_implementation={name!r} is not available on this machine "
                           f"(device={'cuda' if cuda else 'cpu'}); try 'auto'")
    return name


def hf_attn_name(name: str) -> str:
    """The `config._attn_implementation` value for a resolved backend (registers it on first use)."""
    if name in STOCK_BACKENDS:
        return name
    register_backends()
    return _REGISTERED_PREFIX + name


def is_packed_backend(hf_name: str) -> bool:
    return hf_name.startswith(_REGISTERED_PREFIX)


def check_model_supported(model, name: str) -> None:
    """Raise unless `model` (an HF PreTrainedModel) calls the attention backend `name` (resolved).

    The packed backends are registered with transformers' AttentionInterface; only models whose
    attention looks its function up there (`_supports_attention_backend`) would ever call them.
    """
    if name not in PACKED_BACKENDS or getattr(model, "_supports_attention_backend", False):
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(f"{model_type} ({type(model).__name__}) does not route its attention through transformers' "
                     f"AttentionInterface, so the packed attention backend {name!r} cannot reach it; train it "
                     f"with padded rows and stock attention: --no-packed --attn-implementation sdpa")


# ---------------------------------------------------------------------------------------------
# Kernels. HF calls fn(module, q, k, v, attention_mask, dropout=, scaling=, sliding_window=, **kw)
# with q [B, Hq, L, D], k/v [B, Hkv, L, D]; it expects (out [B, L, Hq, D], attn_weights | None).
# ---------------------------------------------------------------------------------------------

def _check_no_cache(query: torch.Tensor, key: torch.Tensor) -> None:
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("packed attention backends do not support a KV cache; generate with "
                           "PrefixLM.generate (it switches to 'sdpa')")


# Keyword arguments with which some architectures change the attention's math (Gemma 2 logit
# soft-capping, gpt-oss attention sinks, T5-style position bias): not implemented here.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def _check_supported(module, kwargs: dict, backend: str, dropout: float = 0.0, has_dropout: bool = True) -> None:
    """Refuse what the backend does not implement instead of silently computing other attention."""
    bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        bad.append("non-causal attention")
    if bad:
        raise NotImplementedError(f"{type(module).__name__} asks attention backend {backend!r} for "
                                  f"{', '.join(bad)}, which the packed backends do not implement; use "
                                  f"attn_implementation 'eager' (stock HF)")
    if dropout and not has_dropout:
        raise NotImplementedError(f"attention backend {backend!r} has no attention dropout (the model asks for "
                                  f"{dropout}); use attn_implementation 'packed_sdpa'")


def _window(sliding_window: int | None, max_len: int) -> int | None:
    """The sliding window, or None when it cannot matter for these sequence lengths."""
    return sliding_window if sliding_window is not None and sliding_window < max_len else None


def _causal_sdpa(query, key, value, scaling, dropout, sliding_window):
    """Plain causal attention (one sequence per row, right padding at most)."""
    L = query.shape[2]
    w = _window(sliding_window, L)
    if w is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             dropout_p=dropout, enable_gqa=True)
    else:
        i = torch.arange(L, device=query.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < w)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             dropout_p=dropout, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _document_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    pos = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)


def _document_mask(cu_seqlens: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    doc = _document_ids(cu_seqlens, length)
    i = torch.arange(length, device=cu_seqlens.device)
    mask = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    return mask


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          sliding_window=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Reference backend: SDPA with a block-diagonal causal mask built from `cu_seq_lens_q`."""
    _check_no_cache(query, key)
    _check_supported(module, kwargs, "packed_sdpa")
    if cu_seq_lens_q is None:
        return _causal_sdpa(query, key, value, scaling, dropout, sliding_window), None
    L = query.shape[2]
    mask = _document_mask(cu_seq_lens_q, L, _window(sliding_window, L))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         dropout_p=dropout, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[1, H, L, D] -> [L, H, D] (packed rows are a single row)."""
    if x.shape[0] != 1:
        raise RuntimeError(f"packed attention expects one packed row, got batch {x.shape[0]}")
    return x[0].transpose(0, 1)


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset:
    return frozenset(inspect.signature(_varlen_fn()).parameters)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     sliding_window=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                     max_length_k=None, **kwargs):
    """FlashAttention over `cu_seqlens` via PyTorch's `varlen_attn` (no padding, no mask)."""
    _check_no_cache(query, key)
    _check_supported(module, kwargs, "varlen", dropout, has_dropout=cu_seq_lens_q is None)
    if cu_seq_lens_q is None:
        return _causal_sdpa(query, key, value, scaling, dropout, sliding_window), None
    fn, params = _varlen_fn(), _varlen_params()
    q, k, v = _flat(query), _flat(key), _flat(value)
    extra = {"scale": scaling}
    w = _window(sliding_window, int(max_length_q))
    if "window_size" in params:  # torch >= 2.12: causal = window (-1, 0)
        extra["window_size"] = (w - 1 if w is not None else -1, 0)
    else:  # torch 2.11: is_causal flag, no sliding window
        if w is not None:
            raise RuntimeError("this torch's varlen_attn has no sliding window; use attn 'flex'")
        extra["is_causal"] = True
    if "enable_gqa" in params:
        extra["enable_gqa"] = True
    # torch 2.11's varlen_attn has no enable_gqa flag, but its FlashAttention kernel takes K/V with
    # fewer heads as they are (grouped-query attention); no copy to the query's head count.
    cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
    max_k = max_length_k if max_length_k is not None else max_length_q
    out = fn(q, k, v, cu_seq_lens_q, cu_k, int(max_length_q), int(max_k), **extra)
    return out.unsqueeze(0), None


def flash_attn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         sliding_window=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                         max_length_k=None, **kwargs):
    """flash-attn's `flash_attn_varlen_func` (FA4 CuTe if installed, else FA2)."""
    _check_no_cache(query, key)
    fn = _flash_attn_fn() if cu_seq_lens_q is not None else None
    # the FA2 branch below passes dropout_p; the other (FA4) has none
    _check_supported(module, kwargs, "flash_attn", dropout,
                     has_dropout=not dropout or fn is None or "max_seqlen_q" in inspect.signature(fn).parameters)
    if cu_seq_lens_q is None:
        return _causal_sdpa(query, key, value, scaling, dropout, sliding_window), None
    q, k, v = _flat(query), _flat(key), _flat(value)
    cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
    max_k = max_length_k if max_length_k is not None else max_length_q
    w = _window(sliding_window, int(max_length_q))
    params = inspect.signature(fn).parameters
    kw = {"softmax_scale": scaling, "causal": True}
    if w is not None:
        kw["window_size"] = (w - 1, 0)
    if "max_seqlen_q" in params:  # FA2 names
        out = fn(q, k, v, cu_seq_lens_q, cu_k, int(max_length_q), int(max_k), dropout_p=dropout, **kw)
    else:  # FA4: (q, k, v, cu_seqlens_q, cu_seqlens_k, ..., max_seqlen_q=..., max_seqlen_k=...)
        out = fn(q, k, v, cu_seqlens_q=cu_seq_lens_q, cu_seqlens_k=cu_k, max_seqlen_q=int(max_length_q),
                 max_seqlen_k=int(max_k), **kw)
    if isinstance(out, tuple):  # FA4 returns (out, lse)
        out = out[0]
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention


_BLOCK_MASK_CACHE: dict = {}


def _flex_block_mask(cu_seqlens: torch.Tensor, length: int, window: int | None):
    """Document-causal BlockMask, built once per batch (all layers share the same `cu_seqlens`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (id(cu_seqlens), cu_seqlens.data_ptr(), length, window)
    if key in _BLOCK_MASK_CACHE:
        return _BLOCK_MASK_CACHE[key][1]
    doc = _document_ids(cu_seqlens, length)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length,
                                   device=cu_seqlens.device)
    _BLOCK_MASK_CACHE.clear()  # one live batch at a time; hold a ref so the id is not reused
    _BLOCK_MASK_CACHE[key] = (cu_seqlens, block_mask)
    return block_mask


def flex_attention_packed(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          sliding_window=None, cu_seq_lens_q=None, **kwargs):
    """flex_attention with a document-causal block mask (sparse: skips cross-document blocks)."""
    _check_no_cache(query, key)
    _check_supported(module, kwargs, "flex", dropout, has_dropout=cu_seq_lens_q is None)
    if cu_seq_lens_q is None:
        return _causal_sdpa(query, key, value, scaling, dropout, sliding_window), None
    L = query.shape[2]
    block_mask = _flex_block_mask(cu_seq_lens_q, L, _window(sliding_window, L))
    out = _compiled_flex()(query, key, value, block_mask=block_mask, scale=scaling,
                           enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


_KERNELS = {"packed_sdpa": packed_sdpa_attention, "varlen": varlen_attention,
            "flex": flex_attention_packed, "flash_attn": flash_attn_attention}


@functools.lru_cache(maxsize=1)
def register_backends() -> None:
    """Register every packed backend with transformers (idempotent)."""
    for name, fn in _KERNELS.items():
        AttentionInterface.register(_REGISTERED_PREFIX + name, fn)


def packed_attention_kwargs(batch: dict) -> dict:
    """The decoder kwargs that carry the packing boundaries to the attention functions."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return {}
    max_len = int(batch["max_seqlen"])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
