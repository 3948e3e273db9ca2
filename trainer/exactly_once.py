"""Exactly-once from the run itself: per epoch, which samples the ranks trained, against the manifest.

Every micro-batch carries a `SampleDigest` of the keys of its examples with loss weight > 0
(made in the data worker, trainer/data.py `collate`; rank-padding duplicates and unreadable
samples have weight 0 and are left out). Each rank adds them up: three Python integers, no device
work. At the end of each epoch the ranks' digests are gathered and rank 0 compares their sum with
the digest of the manifest's train samples (read from the shards' tar headers once), writing an
`epoch` record to train_log.jsonl: count, digest, expected_count, expected_digest, ok, and the
count per rank. A mismatch is a warning naming the difference, or an error with
`--strict-exactly-once`. A run that stops inside an epoch (--max-steps) logs what it trained of it
(`complete: false`, not checked).

The digest (trainer/sample_digest.py) is independent of order, and digests of parts (workers,
ranks, the two halves of a resumed epoch) add up to the digest of the whole.

Resume: a resume checkpoint keeps the sum of every rank's digest of the epoch so far
(TrainerState.sample_digest, gathered when saving); the resumed run's rank 0 starts from it and
the other ranks from nothing, so the epoch's total is the uninterrupted run's.

Examples that truncation drops (TruncationStats "dropped") were delivered with weight > 0 and are
counted: this checks the data plan, not the tokenizer.
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Optional

from common.cli import UserError
from trainer.checkpoint import TrainerState
from trainer.distributed import DistInfo, all_gather_objects, broadcast_object
from trainer.sample_digest import SampleDigest, combine

log = logging.getLogger("trainer")

def shard_keys(path: str | Path) -> list[str]:
    """The sample keys of one WebDataset shard, in order, from its tar headers (tarfile seeks past
    the member data; keys as webdataset groups them: the file name up to its first '.')."""
    keys: dict[str, None] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                d, _, base = member.name.rpartition("/")
                keys[(d + "/" if d else "") + base.split(".", 1)[0]] = None
    return list(keys)


def manifest_train_digest(manifest) -> SampleDigest:
    """The digest of every train sample the manifest lists (what one epoch must train)."""
    total = SampleDigest()
    for path in manifest.shard_paths("train"):
        try:
            total = total + SampleDigest.of(shard_keys(path))
        except (OSError, tarfile.TarError) as e:  # the epoch check cannot be made: say so, do not stop
            log.warning("%s: cannot list its sample keys (%s): the per-epoch exactly-once check counts it as empty",
                        path, e)
    return total


class ExactlyOnceError(UserError, RuntimeError):
    """An epoch trained other samples than the manifest's train split (--strict-exactly-once)."""


class ExactlyOnce:
    """The loop's component: `add` every micro-batch, `at_epoch_end` (collective) after each epoch,
    `fold_into(state)` (collective) before a resume checkpoint is written, `at_end` after the loop."""

    def __init__(self, manifest, dist: DistInfo, runlog, state: TrainerState, strict: bool = False):
        self.manifest, self.dist, self.runlog, self.strict = manifest, dist, runlog, strict
        self.local = SampleDigest()
        saved = state.sample_digest or {}
        if dist.is_main and saved.get("epoch") == state.epoch and "digest" in saved:
            self.local = SampleDigest.from_dict(saved)  # the ranks' sum up to the checkpoint
        self._expected: Optional[SampleDigest] = None
        self._message = ""

    def add(self, batch: dict) -> None:
        d = batch.get("sample_digest")
        if d is not None:
            self.local = self.local + d

    def _gather(self) -> list[SampleDigest]:
        return all_gather_objects(self.local)

    def fold_into(self, state: TrainerState) -> None:
        """Collective: the epoch's digest so far, summed over ranks, into the state a checkpoint saves."""
        state.sample_digest = {"epoch": state.epoch, **combine(self._gather()).as_dict()}

    def expected(self) -> SampleDigest:
        if self._expected is None:
            self._expected = manifest_train_digest(self.manifest)
        return self._expected

    def at_epoch_end(self, state: TrainerState, epoch: int, reset: bool = True) -> bool:
        """Collective: check the epoch's samples against the manifest (rank 0 logs); True when equal.
        `reset`: the next epoch starts from nothing (not when the run ends on this epoch's last batch:
        its final checkpoint keeps the digest, and a resume from it checks the same again)."""
        parts = self._gather()
        if reset:
            self.local = SampleDigest()
            state.sample_digest = {}
        ok = None
        if self.dist.is_main:
            total, expected = combine(parts), self.expected()
            ok = total == expected
            self.runlog.write("epoch", state.step, {
                "epoch": epoch, "complete": True, **total.as_dict(), "expected_count": expected.count,
                "expected_digest": expected.hex, "ok": ok, "rank_counts": [p.count for p in parts]})
            if not ok:
                why = (f"{total.count} samples with loss weight > 0, the manifest's train split has {expected.count}"
                       if total.count != expected.count else
                       f"{total.count} samples as expected, but other ones (digest {total.hex}, expected "
                       f"{expected.hex}): some repeated and as many missing")
                msg = (f"epoch {epoch}: not every train sample was trained exactly once: {why} "
                       f"({self.manifest.shard_dir}; per rank {[p.count for p in parts]}; skipped or unreadable "
                       "shards count as missing)")
                if not self.strict:
                    log.warning("%s", msg)
                self._message = msg
        if self.strict:
            ok, msg = broadcast_object((ok, self._message))  # every rank stops, not only rank 0
            if not ok:
                raise ExactlyOnceError(msg)
        return bool(ok)

    def at_end(self, state: TrainerState, complete_epoch: bool) -> None:
        """Collective, after the loop: a run that stopped inside an epoch logs what it trained of it;
        one that stopped on the epoch's last batch (--max-steps) gets the full check."""
        if state.batches_in_epoch == 0:
            return
        if complete_epoch:
            self.at_epoch_end(state, state.epoch, reset=False)
            return
        parts = self._gather()
        if self.dist.is_main:
            self.runlog.write("epoch", state.step, {"epoch": state.epoch, "complete": False,
                                                    **combine(parts).as_dict(), "rank_counts": [p.count for p in parts]})
