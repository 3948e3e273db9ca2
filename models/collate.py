"""Batch collation: tokenized examples + cached Stage1 latents -> the tensors the prefix-LM eats.

The batch format is fixed in docs/architecture.md ("Batches"). Each example is laid out as

    [BOS] [P image-prefix slots] [prompt rest] [target]          P = num_image_tokens + 1 (0 for D)

Prefix slots hold `pad_id` in `input_ids`; the model overwrites their embeddings with the Stage2
prefix (`prefix_mask` marks them; row-major order == example order == order of `latents`).

Two training layouts:
- packed (default): every example of the micro-batch concatenated into ONE row, no padding (apart
  from optionally rounding the row up to a multiple, e.g. for tensor cores). `cu_seqlens` gives the
  example boundaries so attention never crosses them; `position_ids` restart at 0 per example.
  Rounding padding is appended to the last example's segment: it sits causally *after* every real
  token, so no real token can see it, and the boundary count stays `num_examples + 1`.
- padded: one example per row, right padding, `attention_mask`. Right padding also means plain
  causal attention is exact for every real token.

Besides the keys of the contract, a training batch carries `loss_index` (Long [num_target_tokens]:
flat indices over R*L of the positions whose next token is a target, i.e. the only hidden states
the loss reads, computed here so the model needs no device sync), `prefix_index` (Long
[num_prefix_slots]: flat indices of the prefix slots, for the same reason; generation batches too), `task_counts` (Long [4],
examples per task) and `keys` (sample keys, for logging). `batch_to_device` moves a batch.

Generation uses LEFT padding (so that new tokens are appended at the same column for all rows)
and position ids that start at 0 at the first real token, matching HF `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from models.tasks import IMAGE_TASKS, TASK_IDS, TASKS, TokenizedExample, prefix_length

IGNORE_INDEX = -100


@dataclass
class TrainItem:
    """One example ready for collation. `loss_weight == 0` marks a loss-free padding duplicate
    (used by the data pipeline to give every rank the same number of examples)."""

    example: TokenizedExample
    latent: np.ndarray | torch.Tensor | None  # [D]; may be None for text-only tasks
    cond_id: int
    block_tokens: np.ndarray | torch.Tensor | None = None  # [T, D] when Stage1 blocks are trained
    key: str = ""
    loss_weight: float = 1.0


def _as_float_tensor(x) -> torch.Tensor:
    return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))


def _layout(item: TrainItem, num_image_tokens: int, with_target: bool):
    """(ids, labels, is_prefix) lists for one example: [BOS][prefix][prompt rest][target]."""
    ex = item.example
    if ex.task not in TASK_IDS:
        raise ValueError(f"example {item.key!r}: unknown task {ex.task!r}; known: {TASKS}")
    if ex.uses_image and ex.task not in IMAGE_TASKS:
        raise ValueError(f"example {item.key!r}: task {ex.task!r} cannot use an image prefix")
    p = prefix_length(ex.uses_image, num_image_tokens)
    head = ex.prompt_ids[:1] if ex.has_bos else []
    rest = ex.prompt_ids[1:] if ex.has_bos else list(ex.prompt_ids)
    target = list(ex.target_ids) if with_target else []
    ids = head + [None] * p + rest + target  # None = prefix slot, filled with pad_id below
    keep_loss = with_target and item.loss_weight > 0
    labels = [IGNORE_INDEX] * (len(ids) - len(target)) + (target if keep_loss else [IGNORE_INDEX] * len(target))
    is_prefix = [t is None for t in ids]
    return ids, labels, is_prefix


def _image_tensors(items: Sequence[TrainItem]) -> dict:
    """latents / cond_ids / block_tokens of the examples that use the image, in example order."""
    img = [it for it in items if it.example.uses_image]
    out: dict = {}
    if not img:
        return out
    missing = [it.key for it in img if it.latent is None]
    if missing:
        raise ValueError(f"image examples without a latent: {missing[:5]}")
    out["latents"] = torch.stack([_as_float_tensor(it.latent) for it in img])
    out["cond_ids"] = torch.tensor([int(it.cond_id) for it in img], dtype=torch.long)
    with_blocks = [it.block_tokens is not None for it in img]
    if any(with_blocks):
        if not all(with_blocks):
            bad = [it.key for it in img if it.block_tokens is None][:5]
            raise ValueError(f"block_tokens present for some image examples but missing for {bad}")
        out["block_tokens"] = torch.stack([_as_float_tensor(it.block_tokens) for it in img])
    return out


def _loss_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (over R*L) of the positions whose NEXT token is a target: the only hidden
    states the loss needs. Computed here on the host so the model can gather them without a
    device sync (a device-side `nonzero` would sync)."""
    predicts_target = torch.zeros_like(labels, dtype=torch.bool)
    predicts_target[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts_target.reshape(-1).nonzero().squeeze(1)


def _prefix_index(prefix_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (over R*L) of the prefix slots, row-major (= example order): the splice
    writes the prefix there with `index_copy`, whose backward is a gather (a `masked_scatter`'s
    backward runs a device-side `masked_select` and syncs)."""
    return prefix_mask.reshape(-1).nonzero().squeeze(1)


def _counts(items: Sequence[TrainItem], labels: torch.Tensor, real: int) -> dict:
    task_counts = torch.zeros(len(TASKS), dtype=torch.long)
    for it in items:
        task_counts[TASK_IDS[it.example.task]] += 1
    return {
        "num_examples": len(items),
        "num_target_tokens": int((labels != IGNORE_INDEX).sum()),
        "num_real_tokens": real,
        "task_counts": task_counts,
        "keys": [it.key for it in items],
    }


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def collate_train(items: Sequence[TrainItem], pad_id: int, num_image_tokens: int, packed: bool = True,
                  pad_to_multiple_of: int = 1) -> dict:
    """Collate training examples (see the module docstring for the two layouts)."""
    if not items:
        raise ValueError("collate_train got an empty list of items")
    layouts = [_layout(it, num_image_tokens, with_target=True) for it in items]
    lengths = [len(ids) for ids, _, _ in layouts]
    real = sum(lengths)
    if packed:
        total = _round_up(real, pad_to_multiple_of)
        rows, width = 1, total
    else:
        rows, width = len(items), _round_up(max(lengths), pad_to_multiple_of)

    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    prefix_mask = torch.zeros((rows, width), dtype=torch.bool)
    task_ids = torch.full((rows, width), -1, dtype=torch.long)

    start = 0
    for i, ((ids, lab, pre), it) in enumerate(zip(layouts, items)):
        r, c = (0, start) if packed else (i, 0)
        n = len(ids)
        input_ids[r, c:c + n] = torch.tensor([pad_id if t is None else t for t in ids], dtype=torch.long)
        labels[r, c:c + n] = torch.tensor(lab, dtype=torch.long)
        position_ids[r, c:c + n] = torch.arange(n)
        prefix_mask[r, c:c + n] = torch.tensor(pre, dtype=torch.bool)
        task_ids[r, c:c + n] = TASK_IDS[it.example.task]
        start += n

    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "prefix_mask": prefix_mask, "task_ids": task_ids}
    if packed:
        # Rounding padding joins the last segment: positions continue, no new boundary.
        position_ids[0, real:] = torch.arange(lengths[-1], lengths[-1] + width - real)
        bounds = np.cumsum([0] + lengths)
        bounds[-1] = width
        batch["attention_mask"] = None
        batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        batch["max_seqlen"] = int(max(lengths[:-1] + [lengths[-1] + width - real]))
    else:
        mask = torch.zeros((rows, width), dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        batch["attention_mask"] = mask
    batch["loss_index"] = _loss_index(labels)
    batch["prefix_index"] = _prefix_index(prefix_mask)
    batch.update(_image_tensors(items))
    batch.update(_counts(items, labels, real))
    return batch


def collate_generation(items: Sequence[TrainItem], pad_id: int, num_image_tokens: int) -> dict:
    """Prompts only (targets ignored), LEFT padded, for batched generation with a KV cache."""
    if not items:
        raise ValueError("collate_generation got an empty list of items")
    layouts = [_layout(it, num_image_tokens, with_target=False) for it in items]
    width = max(len(ids) for ids, _, _ in layouts)
    rows = len(items)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)  # pads: 0, as HF generate does
    prefix_mask = torch.zeros((rows, width), dtype=torch.bool)
    task_ids = torch.full((rows, width), -1, dtype=torch.long)
    for i, ((ids, _, pre), it) in enumerate(zip(layouts, items)):
        n = len(ids)
        c = width - n
        input_ids[i, c:] = torch.tensor([pad_id if t is None else t for t in ids], dtype=torch.long)
        attention_mask[i, c:] = 1
        position_ids[i, c:] = torch.arange(n)
        prefix_mask[i, c:] = torch.tensor(pre, dtype=torch.bool)
        task_ids[i, c:] = TASK_IDS[it.example.task]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
             "prefix_mask": prefix_mask, "task_ids": task_ids,
             "prefix_index": _prefix_index(prefix_mask),
             "num_examples": rows, "keys": [it.key for it in items]}
    batch.update(_image_tensors(items))
    return batch


def batch_to_device(batch: dict, device, non_blocking: bool = True, float_dtype: torch.dtype | None = None) -> dict:
    """Move every tensor of a batch to `device`, floats cast to `float_dtype` when given (the model's
    compute dtype); ints, lists and None pass through."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=non_blocking)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out
