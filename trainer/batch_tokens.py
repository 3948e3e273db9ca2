"""`--batch-tokens auto`: the largest micro-batch (tokens per GPU) whose peak memory fits the GPU.

A LoRA step's memory is the frozen weights plus activations that grow linearly with the tokens of
the packed row (attention is flash/varlen, the loss is chunked), so two short forward/backward
probes at start-up give the line `peak = static + per_token * tokens`; the budget is where that
line meets `--auto-memory-fraction` of the GPU, less what the engine will add (fp32 masters, AdamW
moments, gradient buffers of the trainable weights), checked by a third probe at the chosen size
(shrunk by 10% until it fits). Every rank probes its own GPU and all take the smallest answer.

The probes run before the engine exists (no DeepSpeed hooks to disturb, no optimizer state), on
the model cast to its compute dtype (what either engine does first anyway), with gradients
dropped afterwards; dropout draws are reseeded per micro-batch by the loop, so training is
unaffected. A resumed run reuses the budget its checkpoint recorded, so its data plan is the same.
Not probed: a trainable Stage1 tail (`--stage1-trainable-blocks` > 0) runs on the latents here, not
on cached block tokens, so its activations are left to the margin below the fraction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from models.collate import TrainItem, batch_to_device, collate_train
from models.tasks import TokenizedExample, prefix_length
from trainer.data import DEFAULT_BATCH_TOKENS
from trainer.distributed import all_gather_objects

log = logging.getLogger("trainer")

AUTO_MAX_TOKENS = 32768  # rows beyond this gain < 2% tokens/s (README) and cut the optimizer steps per epoch
AUTO_ROUND = 256  # budgets are multiples of this
ENGINE_BYTES_PER_TRAINABLE = 4 + 4 + 4 + 4 + 2  # fp32 master + AdamW m, v + fp32 grad + bf16 grad buffer


@dataclass
class BatchTokensChoice:
    tokens: int
    how: str  # "fixed", "cpu-default", "resumed", "probed"
    detail: dict

    def record(self) -> dict:
        return {"batch_tokens": self.tokens, "batch_tokens_how": self.how, **self.detail}


def probe_batch(tokens: int, seq_len: int, num_image_tokens: int, latent_dim: int, vocab_size: int,
                pad_id: int) -> dict:
    """A packed training batch of `tokens` positions made of image examples of `seq_len` positions
    (the worst case per token: every position a target, every example a prefix)."""
    prompt = 8
    target = seq_len - 1 - prefix_length(True, num_image_tokens) - prompt
    if target < 1:
        raise ValueError(f"--max-seq-len {seq_len} is too short for the probe's examples")
    rng = np.random.default_rng(0)
    items = []
    for _ in range(max(1, tokens // seq_len)):
        ids = rng.integers(3, vocab_size, size=1 + prompt + target).tolist()
        ex = TokenizedExample("summary", True, ids[:1 + prompt], ids[1 + prompt:], has_bos=True)
        items.append(TrainItem(ex, np.zeros(latent_dim, np.float32), cond_id=0))
    return collate_train(items, pad_id, num_image_tokens, packed=True)


def _peak_bytes(model: torch.nn.Module, batch: dict, device: torch.device, dtype: torch.dtype) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    moved = batch_to_device(batch, device, float_dtype=dtype)
    out = model(moved)
    out.loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out, moved
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return peak


def probe_batch_tokens(model: torch.nn.Module, *, seq_len: int, num_image_tokens: int, latent_dim: int,
                       vocab_size: int, pad_id: int, device: torch.device, dtype: torch.dtype,
                       memory_fraction: float, total_bytes: Optional[int] = None,
                       peak_bytes: Callable[[torch.nn.Module, dict, torch.device, torch.dtype], int] = _peak_bytes,
                       ) -> BatchTokensChoice:
    """The largest budget (a multiple of AUTO_ROUND, <= AUTO_MAX_TOKENS) whose probed peak plus the
    engine's state fits `memory_fraction` of this GPU (`total_bytes`; `peak_bytes` measures one
    forward/backward: both replaceable, for tests)."""
    model.to(dtype)
    model.train()
    total = total_bytes or torch.cuda.get_device_properties(device).total_memory
    target = memory_fraction * total
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine_bytes = trainable * ENGINE_BYTES_PER_TRAINABLE
    make = lambda n: probe_batch(n, seq_len, num_image_tokens, latent_dim, vocab_size, pad_id)  # noqa: E731
    t1, t2 = 4 * seq_len, 16 * seq_len
    p1, p2 = peak_bytes(model, make(t1), device, dtype), peak_bytes(model, make(t2), device, dtype)
    per_token = max(1.0, (p2 - p1) / (t2 - t1))
    static = p1 - per_token * t1
    tokens = int((target - engine_bytes - static) / per_token) // AUTO_ROUND * AUTO_ROUND
    tokens = min(tokens, AUTO_MAX_TOKENS)
    if tokens < seq_len:
        raise RuntimeError(
            f"--batch-tokens auto: not even one {seq_len}-token example fits {memory_fraction:.0%} of this GPU "
            f"({total / 2**30:.1f} GiB; weights and engine state take {(static + engine_bytes) / 2**30:.1f} GiB); "
            "use a sharded engine, --gradient-checkpointing or a smaller --max-seq-len")
    checked = None
    for _ in range(4):
        checked = peak_bytes(model, make(tokens), device, dtype)
        if checked + engine_bytes <= target or tokens <= seq_len:
            break
        tokens = max(seq_len, int(tokens * 0.9) // AUTO_ROUND * AUTO_ROUND)
    gib = 2 ** 30
    detail = {"probe_gpu_gib": round(total / gib, 1), "probe_target_gib": round(target / gib, 1),
              "probe_static_gib": round(static / gib, 2), "probe_mib_per_1k_tokens": round(per_token * 1024 / 2**20, 1),
              "probe_engine_gib": round(engine_bytes / gib, 2), "probe_peak_gib": round(checked / gib, 1)}
    return BatchTokensChoice(tokens, "probed", detail)


def resolve_batch_tokens(data_cfg, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                         resumed: Optional[int], **probe_kwargs) -> BatchTokensChoice:
    """--batch-tokens as a number: itself. auto: the budget a resumed run recorded, the CPU default,
    or the smallest probed budget over the ranks (collective in that case)."""
    fixed = data_cfg.fixed_batch_tokens()
    if data_cfg.batch_size > 0:
        return BatchTokensChoice(fixed or DEFAULT_BATCH_TOKENS, "unused (--batch-size)", {})
    if fixed is not None:
        return BatchTokensChoice(fixed, "fixed", {})
    if resumed:
        return BatchTokensChoice(int(resumed), "resumed", {})
    if device.type != "cuda":
        return BatchTokensChoice(DEFAULT_BATCH_TOKENS, "cpu-default", {})
    if any(p.is_meta or hasattr(p, "ds_id") for p in model.parameters()):
        # FSDP2 (meta-built) and ZeRO-3 (partitioned) models only run inside their engine
        log.info("--batch-tokens auto: the model's parameters are sharded, so no probe; %d tokens "
                 "(pass a number to choose)", DEFAULT_BATCH_TOKENS)
        return BatchTokensChoice(DEFAULT_BATCH_TOKENS, "sharded-default", {})
    mine = probe_batch_tokens(model, device=device, dtype=dtype, memory_fraction=data_cfg.auto_memory_fraction,
                              **probe_kwargs)
    choices = all_gather_objects((mine.tokens, mine.detail))
    tokens, detail = min(choices, key=lambda c: c[0])
    log.info("--batch-tokens auto: %d tokens per micro-batch (probed peak %.1f GiB of a %.1f GiB target on a "
             "%.1f GiB GPU; smallest over %d ranks)", tokens, detail["probe_peak_gib"], detail["probe_target_gib"],
             detail["probe_gpu_gib"], len(choices))
    return BatchTokensChoice(tokens, "probed", detail)
