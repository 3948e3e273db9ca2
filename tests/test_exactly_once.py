"""Exactly-once per epoch from the run itself (trainer/exactly_once.py, trainer/sample_digest.py).

The digest of the samples the data pipeline delivers with loss weight > 0 over one epoch must be
the digest of the manifest's train samples (read independently from the tar headers), for 1 and
2 ranks alike, and an epoch interrupted at a batch and resumed there (skip_batches, the trainer's
resume) must add up to the same digest. The component logs the check and fails loudly on a gap.
"""

from __future__ import annotations

import tarfile

import pytest
import torch

from trainer.sample_digest import SampleDigest, combine


def test_digest_is_order_independent_and_adds_up_by_parts():
    keys = [f"2019_md{i:04d}_e{i % 7}" for i in range(50)]
    whole = SampleDigest.of(keys)
    assert whole == SampleDigest.of(reversed(keys)) == combine([SampleDigest.of(keys[:17]), SampleDigest.of(keys[17:])])
    assert whole.count == 50 and SampleDigest.from_dict(whole.as_dict()) == whole
    repeated = SampleDigest.of(keys[:-1] + keys[:1])  # one missing, one twice: same count, other digest
    assert repeated.count == whole.count and repeated != whole
    assert SampleDigest.of(keys + keys[:1]) != whole and SampleDigest.of(keys[1:]) != whole


def _stream(shard_dir, tiny_lm_dir, rank: int, world: int, num_workers: int):
    from data_prep.manifest import load_manifest
    from models.prefix_lm import load_tokenizer
    from trainer.data import DataConfig, TrainStream
    from trainer.schedules import ScheduleConfig, build_phases

    cfg = DataConfig(shard_dir=str(shard_dir), batch_size=8, num_workers=num_workers, shuffle_buffer=16)
    return TrainStream(load_manifest(shard_dir), shard_dir, load_tokenizer(tiny_lm_dir), cfg,
                       build_phases(ScheduleConfig()), 4, rank, world, seed=3)


def _digest(batches) -> SampleDigest:
    return combine(b["sample_digest"] for b in batches)


def test_epoch_digest_equals_the_manifest_for_1_and_2_ranks_and_across_a_resume(shard_dir, tiny_lm_dir):
    from data_prep.manifest import load_manifest
    from trainer.exactly_once import manifest_train_digest

    manifest = load_manifest(shard_dir)
    expected = manifest_train_digest(manifest)
    # independent of the pipeline: every key the tar files hold, via tarfile's own reading
    names = [m.name for p in manifest.shard_paths("train") for m in tarfile.open(p) if m.name.endswith(".json")]
    assert expected == SampleDigest.of(n[:-len(".json")] for n in names)
    assert expected.count == manifest.num_samples("train")

    one = _digest(_stream(shard_dir, tiny_lm_dir, 0, 1, 0).loader(0))
    ranks = [_stream(shard_dir, tiny_lm_dir, r, 2, 2) for r in range(2)]
    full = [list(s.loader(0)) for s in ranks]
    assert one == expected == combine(_digest(b) for b in full)
    # Rank padding (N odd for 2 ranks?) carries weight 0 and stays out of the digest.
    assert sum(len(b["keys"]) for bs in full for b in bs) >= expected.count

    # Resume rank 1 at batch k: the batches before it + the resumed loader = the uninterrupted epoch.
    k = len(full[1]) // 2 + 1
    resumed = _digest(full[1][:k]) + _digest(ranks[1].loader(0, skip_batches=k))
    assert resumed == _digest(full[1])


class _RunLog:
    def __init__(self):
        self.records = []

    def write(self, kind, step, rec):
        self.records.append({"kind": kind, "step": step, **rec})


def test_component_checks_logs_resumes_and_fails_loudly(shard_dir, tiny_lm_dir, caplog):
    from data_prep.manifest import load_manifest
    from trainer.checkpoint import TrainerState
    from trainer.distributed import DistInfo
    from trainer.exactly_once import ExactlyOnce, ExactlyOnceError

    manifest = load_manifest(shard_dir)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    batches = list(_stream(shard_dir, tiny_lm_dir, 0, 1, 0).loader(0))

    # An epoch cut at batch 3 by a checkpoint, resumed by a new component from the saved state.
    runlog, state = _RunLog(), TrainerState(epoch=0)
    first = ExactlyOnce(manifest, dist, runlog, state)
    for b in batches[:3]:
        first.add(b)
    first.fold_into(state)
    assert state.sample_digest["epoch"] == 0 and state.sample_digest["count"] == sum(len(b["keys"]) for b in batches[:3])
    saved = TrainerState(**{**state.__dict__})
    second = ExactlyOnce(manifest, dist, runlog, saved)
    for b in batches[3:]:
        second.add(b)
    assert second.at_epoch_end(saved, 0) is True and saved.sample_digest == {}
    rec = runlog.records[-1]
    assert rec["kind"] == "epoch" and rec["ok"] and rec["complete"]
    assert rec["count"] == rec["expected_count"] == manifest.num_samples("train") and rec["digest"] == rec["expected_digest"]

    # A lost batch is a warning (ok false, the counts named), or an error with --strict-exactly-once.
    lossy = ExactlyOnce(manifest, dist, runlog, TrainerState())
    for b in batches[1:]:
        lossy.add(b)
    assert lossy.at_epoch_end(TrainerState(), 0) is False and not runlog.records[-1]["ok"]
    assert "not every train sample was trained exactly once" in caplog.text
    strict = ExactlyOnce(manifest, dist, runlog, TrainerState(), strict=True)
    for b in batches + batches[:1]:  # one batch twice
        strict.add(b)
    with pytest.raises(ExactlyOnceError, match=f"{len(batches[0]['keys']) + manifest.num_samples('train')} samples"):
        strict.at_epoch_end(TrainerState(), 0)
