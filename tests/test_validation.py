"""The image-use gap of trainer/validation.py: the shuffle and the statistics."""

import numpy as np
import pytest
import torch

from models.tasks import TASKS
from trainer.validation import image_gap_stats, shuffle_images


def test_shuffle_rotates_every_per_image_tensor_and_leaves_the_batch():
    batch = {"latents": torch.arange(6.0).view(3, 2), "cond_ids": torch.tensor([4, 5, 6]),
             "block_tokens": torch.arange(12.0).view(3, 2, 2), "input_ids": torch.ones(1, 5, dtype=torch.long)}
    out = shuffle_images(batch)
    assert torch.equal(out["cond_ids"], torch.tensor([6, 4, 5]))
    assert torch.equal(out["latents"], batch["latents"][[2, 0, 1]])
    assert torch.equal(out["block_tokens"], batch["block_tokens"][[2, 0, 1]])
    assert out["input_ids"] is batch["input_ids"]
    assert torch.equal(batch["cond_ids"], torch.tensor([4, 5, 6]))  # the true batch is untouched
    assert not any(torch.equal(out["latents"][i], batch["latents"][i]) for i in range(3))  # none keeps its own


@pytest.mark.parametrize("n", [0, 1])
def test_no_shuffle_without_two_images(n):
    assert shuffle_images({"latents": torch.zeros(n, 4), "cond_ids": torch.zeros(n, dtype=torch.long)}) is None
    assert shuffle_images({"input_ids": torch.ones(1, 3)}) is None


def _rows(true, shuffled, tokens):
    """[batches, 3, tasks] with the given per-batch sums on 'caption' and zeros elsewhere."""
    rows = np.zeros((len(true), 3, len(TASKS)))
    c = TASKS.index("caption")
    rows[:, 0, c], rows[:, 1, c], rows[:, 2, c] = true, shuffled, tokens
    return rows


def test_gap_is_token_weighted_and_its_ci_covers_it():
    rows = _rows(true=[10.0, 20.0, 30.0, 40.0], shuffled=[11.0, 22.0, 30.5, 44.0], tokens=[10, 20, 10, 40])
    rec = image_gap_stats(rows, seed=0)
    assert rec["image_gap"] == pytest.approx(7.5 / 80)
    assert rec["image_gap_caption"] == pytest.approx(7.5 / 80)
    assert rec["image_gap_ci_low"] <= rec["image_gap"] <= rec["image_gap_ci_high"]
    assert rec["image_gap_ci_low"] > 0  # every batch has shuffled > true
    assert rec["image_gap_batches"] == 4 and "image_gap_summary" not in rec


def test_no_gap_gives_a_ci_around_zero_and_text_only_tokens_do_not_count():
    rows = _rows(true=[5.0, 6.0, 7.0], shuffled=[5.5, 5.5, 7.0], tokens=[10, 10, 10])
    rows[:, 0, TASKS.index("text_summary")] = 100.0  # text-only: no image, never part of the gap
    rows[:, 2, TASKS.index("text_summary")] = 1000
    rec = image_gap_stats(rows, seed=1)
    assert rec["image_gap"] == pytest.approx(0.0)
    assert rec["image_gap_ci_low"] < 0 < rec["image_gap_ci_high"]


def test_nothing_to_measure():
    assert image_gap_stats(np.zeros((0, 3, len(TASKS)))) == {"image_gap_batches": 0}
