"""Batch layout of models.collate: exact positions of BOS / prefix slots / labels, packing, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.collate import IGNORE_INDEX, TrainItem, collate_generation, collate_train
from models.tasks import TASK_IDS, TokenizedExample

PAD, BOS, EOS = 0, 1, 2
NUM_IMAGE_TOKENS = 3  # -> P = 4 prefix slots for image tasks


def item(task: str, prompt_rest: list[int], target: list[int], cond_id: int = 0, latent_seed: int = 0,
         block_tokens: bool = False, loss_weight: float = 1.0, key: str = "") -> TrainItem:
    uses_image = task != "text_summary"
    rng = np.random.default_rng(latent_seed)
    ex = TokenizedExample(task, uses_image, [BOS] + prompt_rest, target + [EOS], has_bos=True)
    return TrainItem(ex, rng.standard_normal(16).astype(np.float16) if uses_image else None, cond_id,
                     rng.standard_normal((5, 16)).astype(np.float16) if block_tokens else None,
                     key=key or task, loss_weight=loss_weight)


@pytest.mark.parametrize("task", ["caption", "summary", "cot", "text_summary"])
def test_single_example_layout(task):
    it = item(task, [10, 11, 12], [20, 21])
    b = collate_train([it], PAD, NUM_IMAGE_TOKENS)
    P = 0 if task == "text_summary" else NUM_IMAGE_TOKENS + 1
    expect_ids = [BOS] + [PAD] * P + [10, 11, 12] + [20, 21, EOS]
    assert b["input_ids"].tolist() == [expect_ids]
    assert b["labels"].tolist() == [[IGNORE_INDEX] * (1 + P + 3) + [20, 21, EOS]]
    assert b["prefix_mask"].tolist() == [[False] + [True] * P + [False] * 6]
    assert b["position_ids"].tolist() == [list(range(len(expect_ids)))]
    assert b["task_ids"].tolist() == [[TASK_IDS[task]] * len(expect_ids)]
    assert b["cu_seqlens"].tolist() == [0, len(expect_ids)] and b["cu_seqlens"].dtype == torch.int32
    assert b["attention_mask"] is None
    assert b["num_target_tokens"] == 3 and b["num_real_tokens"] == len(expect_ids)
    # The loss reads the hidden states that predict a target token: the 3 positions before them.
    assert b["loss_index"].tolist() == [len(expect_ids) - 4, len(expect_ids) - 3, len(expect_ids) - 2]
    if P:
        assert b["latents"].shape == (1, 16) and b["latents"].dtype == torch.float32
        assert b["cond_ids"].tolist() == [0]
    else:
        assert "latents" not in b and "cond_ids" not in b


def mixed_items(**kw):
    return [item("caption", [10, 11], [20], cond_id=3, latent_seed=1, **kw),
            item("text_summary", [12, 13, 14], [21, 22]),
            item("cot", [15], [23, 24, 25], cond_id=7, latent_seed=2, **kw),
            item("summary", [16, 17], [26], cond_id=5, latent_seed=3, **kw)]


def test_packed_row_restarts_positions_and_marks_boundaries():
    items = mixed_items()
    b = collate_train(items, PAD, NUM_IMAGE_TOKENS)
    lengths = [1 + 4 + 2 + 2, 1 + 3 + 3, 1 + 4 + 1 + 4, 1 + 4 + 2 + 2]
    assert b["input_ids"].shape == (1, sum(lengths))
    assert b["cu_seqlens"].tolist() == np.cumsum([0] + lengths).tolist()
    assert b["max_seqlen"] == max(lengths)
    expect_pos = [p for n in lengths for p in range(n)]
    assert b["position_ids"][0].tolist() == expect_pos
    expect_tasks = [TASK_IDS[it.example.task] for it, n in zip(items, lengths) for _ in range(n)]
    assert b["task_ids"][0].tolist() == expect_tasks
    # Every example starts with BOS, whose label is -100: the loss never crosses a boundary.
    starts = b["cu_seqlens"][:-1].long()
    assert (b["input_ids"][0, starts] == BOS).all() and (b["labels"][0, starts] == IGNORE_INDEX).all()
    # Image tensors: only the image examples, in example order.
    assert b["cond_ids"].tolist() == [3, 7, 5]
    np.testing.assert_allclose(b["latents"][1].numpy(), items[2].latent.astype(np.float32))
    assert int(b["prefix_mask"].sum()) == 3 * (NUM_IMAGE_TOKENS + 1)
    assert b["task_counts"].tolist() == [1, 1, 1, 1]
    assert b["num_examples"] == 4 and b["num_target_tokens"] == 2 + 3 + 4 + 2
    assert b["keys"] == ["caption", "text_summary", "cot", "summary"]


def test_packed_rounding_pads_only_the_tail():
    items = mixed_items()
    b = collate_train(items, PAD, NUM_IMAGE_TOKENS, pad_to_multiple_of=16)
    real = b["num_real_tokens"]
    width = b["input_ids"].shape[1]
    assert width % 16 == 0 and width - real < 16
    assert (b["input_ids"][0, real:] == PAD).all() and (b["labels"][0, real:] == IGNORE_INDEX).all()
    assert (b["task_ids"][0, real:] == -1).all()
    # The pad tail joins the last segment (causally after all real tokens); boundaries unchanged.
    assert b["cu_seqlens"].tolist()[-1] == width and len(b["cu_seqlens"]) == len(items) + 1
    last_len = width - int(b["cu_seqlens"][-2])
    assert b["position_ids"][0, -last_len:].tolist() == list(range(last_len))
    assert b["max_seqlen"] >= last_len


def test_padded_mode_right_pads_one_row_per_example():
    items = mixed_items()
    packed = collate_train(items, PAD, NUM_IMAGE_TOKENS)
    b = collate_train(items, PAD, NUM_IMAGE_TOKENS, packed=False)
    assert "cu_seqlens" not in b and b["input_ids"].shape[0] == 4
    lengths = b["attention_mask"].sum(1).tolist()
    for r, n in enumerate(lengths):
        assert b["attention_mask"][r, :n].all() and not b["attention_mask"][r, n:].any()
        assert (b["input_ids"][r, n:] == PAD).all() and (b["labels"][r, n:] == IGNORE_INDEX).all()
        assert (b["task_ids"][r, n:] == -1).all()
        assert b["position_ids"][r, :n].tolist() == list(range(n))
    # Same tokens, labels and prefix slots as the packed row, in the same order.
    real = b["attention_mask"].bool()
    for k in ("input_ids", "labels", "prefix_mask", "position_ids", "task_ids"):
        assert b[k][real].tolist() == packed[k][0].tolist(), k
    assert torch.equal(b["latents"], packed["latents"])


def test_loss_weight_zero_removes_all_labels():
    items = mixed_items()
    items[1].loss_weight = 0.0
    b = collate_train(items, PAD, NUM_IMAGE_TOKENS)
    lo, hi = b["cu_seqlens"][1:3].tolist()
    assert (b["labels"][0, lo:hi] == IGNORE_INDEX).all()
    assert b["num_target_tokens"] == 2 + 4 + 2
    assert b["task_counts"].tolist() == [1, 1, 1, 1]  # still an example (counts keep ranks in step)


def test_block_tokens_stacked_and_mixing_is_an_error():
    b = collate_train(mixed_items(block_tokens=True), PAD, NUM_IMAGE_TOKENS)
    assert b["block_tokens"].shape == (3, 5, 16) and b["block_tokens"].dtype == torch.float32
    items = mixed_items(block_tokens=True)
    items[2].block_tokens = None
    with pytest.raises(ValueError, match="block_tokens"):
        collate_train(items, PAD, NUM_IMAGE_TOKENS)


def test_generation_collate_left_pads_prompts_only():
    items = mixed_items()
    b = collate_generation(items, PAD, NUM_IMAGE_TOKENS)
    lengths = [1 + 4 + 2, 1 + 3, 1 + 4 + 1, 1 + 4 + 2]
    width = max(lengths)
    assert b["input_ids"].shape == (4, width) and "labels" not in b
    for r, (n, it) in enumerate(zip(lengths, items)):
        pad = width - n
        assert b["attention_mask"][r].tolist() == [0] * pad + [1] * n
        assert b["input_ids"][r, pad] == BOS
        assert b["position_ids"][r].tolist() == [0] * pad + list(range(n))
        P = 4 if it.example.uses_image else 0
        assert b["prefix_mask"][r].tolist() == [False] * (pad + 1) + [True] * P + [False] * (n - 1 - P)
        assert b["input_ids"][r, -1] == it.example.prompt_ids[-1]  # prompt ends the row: no target
    assert b["cond_ids"].tolist() == [3, 7, 5]


def test_unknown_task_is_a_clear_error():
    bad = item("caption", [10], [20], key="case-7/shr6")
    bad.example.task = "nope"
    with pytest.raises(ValueError, match="case-7/shr6.*nope"):
        collate_train([bad], PAD, NUM_IMAGE_TOKENS)
