"""The streaming training data pipeline: WebDataset shards -> packed, collated micro-batches.

Splitting (docs/architecture.md, "Data pipeline"). Per epoch:

    train shards, in a seeded (seed, epoch) order -> one virtual sequence of N samples
    -> world_size contiguous rank ranges of ceil(N / W) slots; the < W slots left over are filled
       with loss-free duplicates (loss_weight 0) of a sample of the shorter rank's own range
    -> each rank's slots into num_workers contiguous worker ranges (sizes differ by at most 1)
    -> each worker's range into batches of batch_size (the last one may be partial); with
       --balance-window K each run of K batches is regrouped into K batches of ~equal tokens

Token budgets (--batch-tokens, the default): batch_size is derived per schedule phase as the number
of examples of the phase's mean length (task mix x per-task mean, measured once on the first train
samples) that fill the budget; the balancing then gives every batch ~the budget. The number of
batches stays arithmetic, so ranks agree without talking to each other.

The counts depend only on (N, W, num_workers, batch_size), so every rank has the same number of
batches, every epoch (all ranks must see the same shard files: with --skip-bad-shards a shard
missing on one node only would give that node another plan). A DataLoader returns its workers' batches round-robin, so the position in an
epoch is one integer (batches consumed): `loader(epoch, skip_batches=n)` works out how many batches
each worker had produced, has each worker skip that many samples (before decoding), and rotates
the workers so that the remaining batches come in exactly the order an uninterrupted run gives.

Each worker runs one chain of stages over its range (see `TrainStream._examples`):

    shard tars -> raw samples -> shuffle buffer -> skip (resume) -> decode -> choose task
    -> build prompt -> tokenize/truncate -> token-balanced batches -> collate (+ per-batch stats)

The task of a sample is `schedules.sample_task(phase.probs, seed, epoch, key)`: independent of the
rank/worker layout. A task the sample cannot serve (cot on a one-sentence caption, text_summary
without the case's captions) falls back to caption and is counted.

Shard checksums (the manifest's sha256): a shard is hashed as its tar stream is read and checked
at its last sample, by the one worker whose range holds that sample (workers read a shard from its
start, resume included): a mismatch stops training with a DataError naming the shard. With
--skip-bad-shards a shard is hashed when opened instead, before its samples are used, and a bad one
is skipped whole by every worker (loss-free stand-ins keep the plan), counted in the batch stats
(`bad_shards`, `bad_samples`) and so in train_log.jsonl. See `ShardReader`.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from common.cli import UserError
from common.io import sha256_file, stable_hash
from data_prep.shard_format import ElementSample, SampleFormatError, decode_sample
from models.collate import TrainItem, collate_train
from models.tasks import TASKS, TaskUnavailable, TruncationStats, build_prompt, tokenize_prompt
from trainer.sample_digest import SampleDigest
from trainer.schedules import Phase, enabled_tasks, phase_at, sample_task

log = logging.getLogger("trainer.data")

FALLBACK_TASK = "caption"
VAL_TASK_SEED = 0  # val tasks are fixed: the same held-out examples in every epoch and run
# --batch-tokens: example lengths are measured on this many train samples (manifest order, so every
# rank measures the same ones and derives the same batch sizes)
LENGTH_PROBE_SAMPLES = 256
DEFAULT_BATCH_TOKENS = 4096  # --batch-tokens auto where no GPU is probed (CPU)
DEFAULT_AUTO_MEMORY_FRACTION = 0.85


class DataError(UserError, RuntimeError):
    """A shard or sample cannot be read; the message names the shard file (and sample)."""


@dataclass
class DataConfig:
    shard_dir: str = field(default="", metadata={"help": "directory built by python -m data_prep.build_shards (shards, cases.jsonl, manifest.json)"})
    batch_size: int = field(default=0, metadata={"help": "examples per micro-batch per GPU, fixed (packed into one row by default); 0 = derived from --batch-tokens for each schedule phase"})
    batch_tokens: str = field(default="auto", metadata={"help": "token budget of a micro-batch per GPU (image prefixes included), used when --batch-size is 0: each schedule phase gets the number of examples per micro-batch whose mean length, measured on the first train samples with this tokenizer, fills the budget, and --balance-window evens the tokens across batches. auto = on a GPU the largest budget whose probed peak memory fits --auto-memory-fraction of the GPU (a short forward/backward probe at start-up, logged in the start record and kept for --resume), on CPU 4096; or a number. Peak memory grows with the budget (README.md's Performance section has measured figures)"})
    auto_memory_fraction: float = field(default=DEFAULT_AUTO_MEMORY_FRACTION, metadata={"help": "--batch-tokens auto: the share of the GPU's memory the probed peak may reach"})
    num_workers: int = field(default=2, metadata={"help": "data-loader worker processes per GPU (0 = load in the training process)"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "samples each worker holds in its shuffle buffer (<= 1 = no shuffling inside a worker)"})
    max_seq_len: int = field(default=256, metadata={"help": "max positions per example, image prefix included; longer ones are truncated (counted per task)"})
    balance_window: int = field(default=8, metadata={"help": "token-balanced micro-batches: each data worker regroups every window of this many batches (x --batch-size examples) so that the batches carry ~equal tokens (longest first onto the lightest batch); the batch count is unchanged, so ranks still agree, and GPUs wait less for each other (1 = plain consecutive batches)"})
    packed: bool = field(default=True, metadata={"help": "pack each micro-batch into one row with per-example attention (--no-packed: one padded row per example)"})
    skip_bad_shards: bool = field(default=False, metadata={"help": "log and skip missing/truncated shards, shards whose sha256 does not match the manifest, and unreadable samples (counted in train_log.jsonl: bad_shards, bad_samples) instead of stopping with an error"})
    val_max_samples: int = field(default=256, metadata={"help": "held-out loss is computed on at most this many val samples (0 = off)"})
    strict_exactly_once: bool = field(default=False, metadata={"help": "stop with an error when an epoch did not train every train sample of the manifest exactly once (the `epoch` records of train_log.jsonl; default: a warning)"})

    def fixed_batch_tokens(self) -> Optional[int]:
        """--batch-tokens as a number, or None for auto."""
        text = str(self.batch_tokens).strip().lower()
        if text == "auto":
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--batch-tokens must be 'auto' or a whole number of tokens (got {self.batch_tokens!r})") from None

    def validate(self) -> None:
        if self.batch_size < 0:
            raise ValueError(f"--batch-size must be >= 1, or 0 for --batch-tokens (got {self.batch_size})")
        fixed = self.fixed_batch_tokens()
        if self.batch_size == 0 and fixed is not None and fixed < self.max_seq_len:
            raise ValueError(f"--batch-tokens ({fixed}) must be >= --max-seq-len ({self.max_seq_len}) "
                             "so that a micro-batch holds its longest example (or pass a fixed --batch-size)")
        if not 0.1 <= self.auto_memory_fraction <= 0.98:
            raise ValueError(f"--auto-memory-fraction must be in [0.1, 0.98] (got {self.auto_memory_fraction})")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0 (got {self.num_workers})")
        if self.balance_window < 1:
            raise ValueError(f"--balance-window must be >= 1 (got {self.balance_window})")
        if self.shuffle_buffer < 0:
            raise ValueError(f"--shuffle-buffer must be >= 0 (got {self.shuffle_buffer})")
        if self.max_seq_len < 16:
            raise ValueError(f"--max-seq-len must be >= 16 (got {self.max_seq_len})")
        if self.val_max_samples < 0:
            raise ValueError(f"--val-max-samples must be >= 0 (got {self.val_max_samples})")


# ----------------------------------------------------------------------------------------------
# The plan: pure integer arithmetic over the virtual sequence, identical on every rank


@dataclass(frozen=True)
class ShardSpan:
    """One shard's place in an epoch's virtual sequence: samples [start, start + num_samples)."""

    path: str
    start: int
    num_samples: int
    sha256: str = ""  # the manifest's hash of the file ("" = not checked)


@dataclass(frozen=True)
class WorkerRange:
    """A worker's slots: real virtual positions, then (maybe) one loss-free duplicate."""

    positions: range
    duplicate: Optional[int]  # virtual position re-read as a loss_weight 0 copy (rank padding)
    num_batches: int

    @property
    def num_slots(self) -> int:
        return len(self.positions) + (self.duplicate is not None)


def split_evenly(n: int, parts: int) -> list[range]:
    """`parts` contiguous ranges covering range(n); sizes differ by at most 1, larger ones first."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def lay_out(spans_sizes: Sequence[tuple[str, int]], sha256: Optional[dict[str, str]] = None) -> list[ShardSpan]:
    """The shards one after another in a virtual sequence; `sha256` maps a path to its manifest hash."""
    spans, start = [], 0
    for path, size in spans_sizes:
        spans.append(ShardSpan(path, start, size, (sha256 or {}).get(path, "")))
        start += size
    return spans


def plan_rank(num_samples: int, rank: int, world_size: int, num_workers: int, batch_size: int) -> list[WorkerRange]:
    """The worker ranges of `rank` over a virtual sequence of `num_samples` samples."""
    if num_samples < 1:
        raise DataError("no samples to split across ranks (is the split empty?)")
    slots_per_rank = math.ceil(num_samples / world_size)
    real = split_evenly(num_samples, world_size)[rank]
    # A shorter rank re-reads one of its own samples (its last); with N < W it has none of its
    # own and borrows one from the global sequence.
    duplicate = None
    if len(real) < slots_per_rank:
        duplicate = real[-1] if len(real) else rank % num_samples
    workers = []
    for slots in split_evenly(slots_per_rank, max(1, num_workers)):
        positions = range(real.start + slots.start, real.start + min(slots.stop, len(real)))
        dup = duplicate if (duplicate is not None and slots.stop == slots_per_rank and len(slots)) else None
        workers.append(WorkerRange(positions, dup, math.ceil(len(slots) / batch_size)))
    return workers


def round_robin_order(batch_counts: Sequence[int]) -> list[int]:
    """Which worker each batch of a DataLoader comes from: round-robin over the workers that
    still have batches (how torch's DataLoader interleaves IterableDataset workers)."""
    return [w for r in range(max(batch_counts, default=0)) for w, c in enumerate(batch_counts) if r < c]


def resume_point(batch_counts: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """(batches each worker already produced, the worker the next batch comes from)."""
    order = round_robin_order(batch_counts)
    if not 0 <= consumed <= len(order):
        raise ValueError(f"skip_batches={consumed} is outside the epoch's 0..{len(order)} batches")
    done = [0] * len(batch_counts)
    for w in order[:consumed]:
        done[w] += 1
    return done, (order[consumed] if consumed < len(order) else 0)


@dataclass(frozen=True)
class WorkerJob:
    """Everything one data-loader worker needs to run its stage chain (picklable)."""

    spans: tuple[ShardSpan, ...]
    work: WorkerRange
    skip_batches: int  # resume: batches of this worker already consumed
    shuffle_buffer: int
    shuffle_seed: int
    probs: dict
    task_seed: int
    task_epoch: int
    batch_size: int = 1  # examples per batch (before token balancing)


# ----------------------------------------------------------------------------------------------
# Stages: each takes an iterator and returns one


@dataclass
class Example:
    """One sample on its way through the stages."""

    raw: Optional[dict]  # tar sample (ext -> bytes); None if it could not be read (skip_bad_shards)
    loss_weight: float
    where: str = ""
    sample: Optional[ElementSample] = None
    bad: bool = False  # stands in (loss-free) for an unreadable sample
    bad_shard: bool = False  # the last sample of a shard found bad (counts the shard once per epoch)
    task: str = ""
    fell_back: bool = False
    dropped_task: str = ""  # the task first chosen, when it did not fit max_seq_len
    prompt: object = None
    tokens: object = None  # TokenizedExample, or None when truncation dropped it


def tar_samples(path: str, wrap: Optional[Callable] = None) -> Iterator[dict]:
    """The samples of one local shard, via webdataset's tar reading; `wrap(file)` gives the file
    object the tar reader reads from (e.g. a ShardHasher)."""
    with open(path, "rb") as f:
        stream = f if wrap is None else wrap(f)
        yield from group_by_keys(tar_file_expander([{"url": path, "stream": stream}]))


class ShardHasher:
    """The file object a shard's tar reader reads from: it hashes the bytes as the tar stream
    consumes them, so checking a shard costs no extra pass over it."""

    def __init__(self, f, path: str):
        self.f, self.path, self.sha = f, path, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """The hash of the whole file: what the tar reader left unread (its end padding) is read now."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()

    def __str__(self) -> str:  # webdataset names the stream in its exceptions
        return self.path


def checksum_mismatch(path: str, expected: str, actual: str) -> str:
    return (f"{path}: sha256 {actual} does not match the manifest's {expected}: the shard changed after "
            "it was built (a bad copy or disk?); rebuild the shards")


class ShardReader:
    """Reads samples by virtual position (non-decreasing), opening each shard at most once.

    Checksums (the manifest's sha256 of each shard): by default the bytes are hashed as the tar
    stream is read (ShardHasher) and compared when the shard's last sample has been read, and a
    mismatch stops with a DataError. A worker always reads a shard from its start (also when its
    range or a resume begins inside it), so the worker whose range holds the shard's last sample
    checks the whole file, once per epoch. Samples of the shard read before its end may have been
    used by then. With skip_bad the whole file is hashed when the shard is opened, before any of its
    samples is used: a bad shard is then skipped entirely (its samples become loss-free stand-ins,
    as unreadable ones do), by every worker that reads it, and so is trained all or not at all.
    """

    def __init__(self, spans: Sequence[ShardSpan], skip_bad: bool):
        self.spans, self.skip_bad = list(spans), skip_bad
        self.starts = [s.start for s in self.spans]
        self.span: Optional[ShardSpan] = None
        self.samples: Optional[Iterator[dict]] = None
        self.hasher: Optional[ShardHasher] = None  # the open shard's hash, while it is checked as read
        self.next_offset = 0
        self.broken = False
        self.last: tuple[int, Optional[dict]] = (-1, None)

    def _open(self, span: ShardSpan) -> None:
        self.close()
        self.span, self.next_offset, self.broken = span, 0, False
        wrap = None
        if span.sha256 and self.skip_bad:
            try:
                actual = sha256_file(span.path)
            except OSError:
                actual = None  # unreadable: found (and skipped) by the reader below
            if actual is not None and actual != span.sha256:
                log.warning("%s; skipping its %d samples this epoch: they become loss-free stand-ins (counted "
                            "as bad_samples, the shard as bad_shards; --skip-bad-shards)",
                            checksum_mismatch(span.path, span.sha256, actual), span.num_samples)
                self.broken = True
        elif span.sha256:
            wrap = self._hash_as_read
        self.samples = tar_samples(span.path, wrap)

    def _hash_as_read(self, f) -> ShardHasher:
        self.hasher = ShardHasher(f, self.span.path)
        return self.hasher

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
        self.samples, self.hasher = None, None

    def read(self, position: int) -> Optional[dict]:
        if position == self.last[0]:
            return self.last[1]
        span = self.spans[bisect.bisect_right(self.starts, position) - 1]
        if span is not self.span:
            self._open(span)
        offset = position - span.start
        raw = None
        if not self.broken:
            try:
                while self.next_offset <= offset:
                    raw = next(self.samples)
                    self.next_offset += 1
            except StopIteration:
                self._fail(offset, f"the shard ends after {self.next_offset} samples, the manifest "
                                   f"records {span.num_samples}")
            except Exception as e:  # tarfile.ReadError, EOFError, OSError, ...
                self._fail(offset, f"{type(e).__name__}: {e}")
            if not self.broken and self.next_offset == span.num_samples and self.hasher is not None:
                self._check_hash()
        self.last = (position, raw if not self.broken else None)
        return self.last[1]

    def _check_hash(self) -> None:
        """After the shard's last sample: the hash of the whole file against the manifest's."""
        hasher, self.hasher = self.hasher, None
        try:
            actual = hasher.hexdigest_to_end()
        except OSError as e:
            raise DataError(f"{self.span.path}: cannot read to its end: {type(e).__name__}: {e}") from None
        if actual != self.span.sha256:
            raise DataError(checksum_mismatch(self.span.path, self.span.sha256, actual)
                            + " (or pass --skip-bad-shards to train without it)")

    def _fail(self, offset: int, why: str) -> None:
        msg = f"{self.span.path}: cannot read sample {offset} (truncated or corrupt shard?): {why}"
        if not self.skip_bad:
            raise DataError(msg + " (pass --skip-bad-shards to skip such samples)")
        log.warning("%s; its remaining samples are replaced by loss-free duplicates", msg)
        self.broken = True


def read_range(spans: Sequence[ShardSpan], work: WorkerRange, skip_bad: bool) -> Iterator[Example]:
    reader = ShardReader(spans, skip_bad)
    slots = itertools.chain(((p, 1.0) for p in work.positions),
                            [] if work.duplicate is None else [(work.duplicate, 0.0)])
    try:
        for position, weight in slots:
            raw = reader.read(position)
            span = reader.span
            ex = Example(raw, weight, where=f"{span.path}#{position - span.start}")
            # Exactly one worker of one rank owns a shard's last sample: it counts a bad shard.
            ex.bad_shard = weight > 0 and reader.broken and position == span.start + span.num_samples - 1
            yield ex
    finally:
        reader.close()


def shuffle_buffer(examples: Iterable, size: int, rng: random.Random) -> Iterator:
    """Emit items in a random order drawn from a buffer of `size` (deterministic given `rng`)."""
    if size <= 1:
        yield from examples
        return
    buf: list = []
    for ex in examples:
        buf.append(ex)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def decode(examples: Iterable[Example], skip_bad: bool,
           stand_in: Optional[Callable[[], Optional[ElementSample]]] = None) -> Iterator[Example]:
    """Raw bytes -> ElementSample. With skip_bad, an unreadable sample becomes a loss-free copy
    of the last good one, so that the batch layout (and so resume) is unchanged; before the first
    good one (e.g. a worker whose range starts in a skipped shard) of `stand_in()`'s sample."""
    last_good: Optional[ElementSample] = None
    for ex in examples:
        try:
            if ex.raw is None:
                raise SampleFormatError(f"{ex.where}: unreadable sample")
            ex.sample = decode_sample(ex.raw)
            last_good = ex.sample
        except SampleFormatError as e:
            if not skip_bad:
                raise DataError(f"{e} (pass --skip-bad-shards to skip such samples)") from None
            if last_good is None and stand_in is not None:
                last_good = stand_in()
            if last_good is None:
                raise DataError(f"{e}; no readable sample to stand in for it") from None
            ex.sample, ex.loss_weight, ex.bad = last_good, 0.0, True
        ex.raw = None  # free the bytes early
        yield ex


def first_readable_sample(spans: Sequence[ShardSpan], skip_bad: bool) -> Optional[ElementSample]:
    """The first sample of the first readable shard (in `spans` order: a function of the files, so
    the same in every run): decode's stand-in for a worker that has no readable sample of its own."""
    reader = ShardReader(spans, skip_bad)
    try:
        for span in spans:
            raw = reader.read(span.start) if span.num_samples else None
            if raw is not None:
                try:
                    return decode_sample(raw)
                except SampleFormatError:
                    continue
    finally:
        reader.close()
    return None


def choose_task(examples: Iterable[Example], probs: dict, seed: int, epoch: int) -> Iterator[Example]:
    for ex in examples:
        ex.task = sample_task(probs, seed, epoch, ex.sample.key)
        yield ex


def build_prompts(examples: Iterable[Example], case_captions: dict[str, list[str]]) -> Iterator[Example]:
    for ex in examples:
        try:
            ex.prompt = _prompt(ex.task, ex.sample, case_captions)
        except TaskUnavailable:
            ex.task, ex.fell_back = FALLBACK_TASK, True
            ex.prompt = _prompt(FALLBACK_TASK, ex.sample, case_captions)
        yield ex


def _prompt(task: str, s: ElementSample, case_captions: dict[str, list[str]]):
    return build_prompt(task, cond_name=s.cond_name, caption=s.caption, global_summary=s.global_summary,
                        case_captions=case_captions.get(s.case_id, ()))


def tokenize(examples: Iterable[Example], tokenizer, max_seq_len: int, num_image_tokens: int) -> Iterator[Example]:
    """Tokenize + truncate. An example whose fixed prompt parts alone exceed max_seq_len (e.g. a
    cot head with long caption sentences) is dropped for its task (counted) and falls back to
    caption, so the batch keeps its size; with bs=1 a drop would otherwise empty the batch."""
    for ex in examples:
        ex.tokens = tokenize_prompt(ex.prompt, tokenizer, max_seq_len, num_image_tokens)
        if ex.tokens is None and ex.task != FALLBACK_TASK:
            ex.dropped_task, ex.task, ex.fell_back = ex.task, FALLBACK_TASK, True
            ex.prompt = _prompt(FALLBACK_TASK, ex.sample, {})
            ex.tokens = tokenize_prompt(ex.prompt, tokenizer, max_seq_len, num_image_tokens)
        yield ex


def batched(examples: Iterable[Example], batch_size: int) -> Iterator[list[Example]]:
    """Batches by sample count (dropped examples included), so the layout never depends on text."""
    it = iter(examples)
    while chunk := list(itertools.islice(it, batch_size)):
        yield chunk


def example_tokens(ex: Example, prefix_tokens: int) -> int:
    """Positions an example takes in a packed row: text, plus the image prefix when its task uses one."""
    if ex.tokens is None:
        return 0
    t = ex.tokens
    return len(t.prompt_ids) + len(t.target_ids) + (prefix_tokens if t.uses_image else 0)


def balanced_batches(window: Sequence[Example], num_batches: int, prefix_tokens: int) -> list[list[Example]]:
    """`window` regrouped into `num_batches` batches of ~equal tokens.

    Longest first, each onto the batch with the fewest tokens so far (then the fewest examples, then
    the lowest index): LPT scheduling, within one longest example of the mean. Every batch gets at
    least one example. Within a batch the examples keep their stream order. Deterministic.
    """
    sizes = [example_tokens(ex, prefix_tokens) for ex in window]
    heap = [(0, 0, b) for b in range(num_batches)]
    members: list[list[int]] = [[] for _ in range(num_batches)]
    for i in sorted(range(len(window)), key=lambda i: (-sizes[i], i)):
        tokens, count, b = heapq.heappop(heap)
        members[b].append(i)
        heapq.heappush(heap, (tokens + sizes[i], count + 1, b))
    return [[window[i] for i in sorted(m)] for m in members]


def windowed_batches(examples: Iterable[Example], batch_size: int, window: int, prefix_tokens: int,
                     skip_batches: int = 0) -> Iterator[list[Example]]:
    """Token-balanced batches: each run of `window` x `batch_size` examples becomes `window` batches
    (a last, shorter run ceil(n / batch_size) batches), so the count per worker is exactly that of
    `batched`. `examples` must already start at a window boundary; the first `skip_batches`
    (< window) batches of the first window are dropped (exact resume inside a window)."""
    it = iter(examples)
    while chunk := list(itertools.islice(it, batch_size * window)):
        out = (balanced_batches(chunk, math.ceil(len(chunk) / batch_size), prefix_tokens) if window > 1
               else [chunk])
        yield from out[skip_batches:]
        skip_batches = 0


def collate(batches: Iterable[list[Example]], pad_id: int, num_image_tokens: int, packed: bool,
            max_seq_len: int) -> Iterator[dict]:
    for chunk in batches:
        kept = [ex for ex in chunk if ex.tokens is not None]
        if not kept:
            raise DataError(f"every example of a batch was dropped by truncation ({chunk[0].where}, ...): "
                            f"--max-seq-len {max_seq_len} leaves no room even for a caption example")
        items = [TrainItem(ex.tokens, ex.sample.latent, ex.sample.cond_id, ex.sample.block_tokens,
                           key=ex.sample.key, loss_weight=ex.loss_weight) for ex in kept]
        batch = collate_train(items, pad_id, num_image_tokens, packed=packed)
        batch["loss_weights"] = [it.loss_weight for it in items]
        batch["stats"] = batch_stats(chunk)
        # exactly-once per epoch (trainer/exactly_once.py): every loss-weighted example delivered,
        # those that truncation dropped included (they are counted in the truncation stats)
        batch["sample_digest"] = SampleDigest.of(ex.sample.key for ex in chunk if ex.loss_weight > 0)
        yield batch


def batch_stats(chunk: Sequence[Example]) -> dict:
    """What the trainer logs about a batch: task mix, fallbacks, padding, bad samples, truncation."""
    trunc = TruncationStats()
    task_counts = {t: 0 for t in TASKS}
    for ex in chunk:
        if ex.loss_weight > 0:
            if ex.dropped_task:
                trunc.add(None, ex.dropped_task)
            task_counts[ex.task] += ex.tokens is not None
            trunc.add(ex.tokens, ex.task)
    return {
        "task_counts": task_counts,
        "task_fallbacks": sum(ex.fell_back for ex in chunk if ex.loss_weight > 0),
        "pad_duplicates": sum(ex.loss_weight == 0 and not ex.bad for ex in chunk),
        "bad_samples": sum(ex.bad for ex in chunk),
        "bad_shards": sum(ex.bad_shard for ex in chunk),  # once per bad shard and epoch over all ranks
        "truncation": trunc.as_dict(),
    }


# ----------------------------------------------------------------------------------------------
# The stream


class _JobsDataset(IterableDataset):
    """DataLoader worker j runs jobs[j] (in-process with num_workers=0: the single job)."""

    def __init__(self, jobs: Sequence[WorkerJob], run: Callable[[WorkerJob], Iterator[dict]]):
        self.jobs, self.run = list(jobs), run

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        jobs = self.jobs if info is None else [self.jobs[info.id]]
        for job in jobs:
            yield from self.run(job)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers tokenize and copy small arrays; leave the cores to the GPU feeders


class TrainStream:
    """The train (and val) batches of one rank. See the module docstring for the design."""

    def __init__(self, manifest, shard_dir, tokenizer, data_cfg: DataConfig, phases: Sequence[Phase],
                 num_image_tokens: int, rank: int, world_size: int, seed: int, batch_tokens: Optional[int] = None):
        """`batch_tokens`: the budget --batch-tokens resolved to (trainer.batch_tokens); None = the
        configured number, or DEFAULT_BATCH_TOKENS for auto."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.manifest, self.shard_dir = manifest, Path(shard_dir)
        self.tokenizer, self.cfg, self.phases = tokenizer, data_cfg, list(phases)
        self.batch_tokens = batch_tokens or data_cfg.fixed_batch_tokens() or DEFAULT_BATCH_TOKENS
        self.num_image_tokens, self.rank, self.world_size, self.seed = num_image_tokens, rank, world_size, seed
        self.pad_id = _pad_id(tokenizer)
        self.skipped_shards: list[str] = []
        self.shard_sha256: dict[str, str] = {}  # path -> the manifest's hash, checked as the shard is read
        self.train_shards = self._usable_shards("train")
        self.val_shards = self._usable_shards("val")
        self.num_train_samples = sum(n for _, n in self.train_shards)
        self.num_val_samples = min(sum(n for _, n in self.val_shards), data_cfg.val_max_samples)
        self.num_workers = data_cfg.num_workers
        self.tasks = enabled_tasks(self.phases)
        self.case_captions = self._load_case_captions() if "text_summary" in self.tasks else {}
        self.task_lengths = self._probe_task_lengths() if data_cfg.batch_size == 0 else {}
        self.phase_batch_sizes = {p.name: self.batch_size_for(p.probs) for p in self.phases}
        self.val_batch_size = self.batch_size_for(self.val_probs)
        log.info("train: %d samples in %d shards -> %d batches per epoch per rank (%d ranks x %d workers x "
                 "batch %s); val: %d samples", self.num_train_samples, len(self.train_shards),
                 self.batches_per_epoch, world_size, max(1, self.num_workers),
                 "/".join(str(b) for b in self.phase_batch_sizes.values()), self.num_val_samples)

    # -- batch sizes (--batch-size, or derived from --batch-tokens) ------------------------------

    def batch_size_for(self, probs: dict) -> int:
        """Examples per micro-batch for a task mix: --batch-size, or as many examples of the mix's
        mean length as fill --batch-tokens. A pure function of the probe, so every rank agrees."""
        if self.cfg.batch_size > 0:
            return self.cfg.batch_size
        mean = sum(p * self.task_lengths[t] for t, p in probs.items() if p > 0) / max(1e-12, sum(
            p for t, p in probs.items() if p > 0))
        return max(1, int(self.batch_tokens // max(1.0, mean)))

    def _probe_task_lengths(self) -> dict[str, float]:
        """Mean positions an example takes in a packed row, per enabled task, over the first
        LENGTH_PROBE_SAMPLES train samples: the pipeline's own prompt, fallback and truncation rules."""
        n = min(LENGTH_PROBE_SAMPLES, self.num_train_samples)
        spans, skip_bad = lay_out(self.train_shards, self.shard_sha256), self.cfg.skip_bad_shards
        examples = decode(read_range(spans, WorkerRange(range(n), None, 1), skip_bad), skip_bad,
                          stand_in=lambda: first_readable_sample(spans, skip_bad))
        totals = {t: 0 for t in self.tasks}
        for ex in examples:
            for task in self.tasks:
                probe = Example(None, 1.0, where=ex.where, sample=ex.sample, task=task)
                probe = next(tokenize(build_prompts([probe], self.case_captions), self.tokenizer,
                                      self.cfg.max_seq_len, self.num_image_tokens))
                totals[task] += example_tokens(probe, self.num_image_tokens + 1)
        lengths = {t: total / n for t, total in totals.items()}
        log.info("--batch-tokens %d: mean example length over %d train samples: %s", self.batch_tokens, n,
                 ", ".join(f"{t} {v:.1f}" for t, v in lengths.items()))
        return lengths

    def batch_size_of(self, epoch: int) -> int:
        return self.phase_batch_sizes[phase_at(self.phases, epoch).name]

    def num_batches(self, epoch: int) -> int:
        """Batches of `epoch` on this rank (equal on every rank)."""
        return sum(w.num_batches for w in self._train_plan(epoch)[1])

    @property
    def batches_per_epoch(self) -> int:
        """Batches of the first epoch (with --batch-tokens, phases of other task mixes may differ)."""
        return self.num_batches(0)

    @property
    def layout(self) -> dict:
        """What a position (batches consumed) means: resuming with another layout cannot be exact,
        so the trainer can store this with its state and compare on resume."""
        return {"world_size": self.world_size, "num_workers": max(1, self.num_workers),
                "batch_sizes": dict(self.phase_batch_sizes), "balance_window": self.cfg.balance_window,
                "num_train_samples": self.num_train_samples, "seed": self.seed}

    # -- set-up checks --------------------------------------------------------------------------

    def _usable_shards(self, split: str) -> list[tuple[str, int]]:
        """(path, num_samples) of the split's shards, after a cheap existence + size check."""
        usable = []
        for entry in self.manifest.entries(split):
            path = self.shard_dir / entry.name
            problem = None
            if not path.is_file():
                problem = "is missing"
            elif entry.size >= 0 and path.stat().st_size != entry.size:
                problem = (f"has {path.stat().st_size} bytes, the manifest records {entry.size} "
                           "(truncated or modified after the build?)")
            if problem is None:
                usable.append((str(path), entry.num_samples))
                self.shard_sha256[str(path)] = entry.sha256
                continue
            msg = f"{path}: shard listed in the manifest {problem}"
            if not self.cfg.skip_bad_shards:
                raise DataError(msg + " (rebuild the shards, or pass --skip-bad-shards to train without it)")
            log.warning("%s; skipping its %d samples (--skip-bad-shards)", msg, entry.num_samples)
            self.skipped_shards.append(entry.name)
        if split == "train" and not any(n for _, n in usable):
            raise DataError(f"{self.shard_dir}: no readable train samples in the manifest's shards")
        return usable

    def _load_case_captions(self) -> dict[str, list[str]]:
        path = self.shard_dir / self.manifest.cases_file
        if not path.is_file():
            raise DataError(f"{path}: missing; task text_summary needs the case captions (rebuild the shards)")
        captions = {}
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    case = json.loads(line)
                    captions[case["case_id"]] = list(case["captions"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{path}: line {i}: bad case record ({type(e).__name__}: {e})") from None
        return captions

    # -- plans ----------------------------------------------------------------------------------

    def _train_plan(self, epoch: int) -> tuple[list[ShardSpan], list[WorkerRange]]:
        shards = list(self.train_shards)
        random.Random(stable_hash(f"shards/{self.seed}/{epoch}")).shuffle(shards)
        return lay_out(shards, self.shard_sha256), plan_rank(self.num_train_samples, self.rank, self.world_size,
                                          self.num_workers, self.batch_size_of(epoch))

    def _jobs(self, spans, workers: list[WorkerRange], skip_batches: int, epoch: int, probs: dict,
              task_seed: int, shuffle: bool, batch_size: int) -> list[WorkerJob]:
        done, first = resume_point([w.num_batches for w in workers], skip_batches)
        # DataLoader worker j plays worker (first + j): its round-robin then continues where the
        # interrupted epoch stopped.
        order = [(first + j) % len(workers) for j in range(len(workers))]
        return [WorkerJob(spans=tuple(spans), work=workers[k], skip_batches=done[k],
                          shuffle_buffer=self.cfg.shuffle_buffer if shuffle else 0,
                          shuffle_seed=stable_hash(f"buffer/{self.seed}/{epoch}/{self.rank}/{k}"),
                          probs=probs, task_seed=task_seed, task_epoch=epoch, batch_size=batch_size)
                for k in order]

    # -- the stage chain ------------------------------------------------------------------------

    def _examples(self, job: WorkerJob, skip_samples: int = 0) -> Iterator[Example]:
        skip_bad = self.cfg.skip_bad_shards
        stream = read_range(job.spans, job.work, skip_bad)
        stream = shuffle_buffer(stream, job.shuffle_buffer, random.Random(job.shuffle_seed))
        stream = itertools.islice(stream, skip_samples, None)  # resume: before any decoding
        stream = decode(stream, skip_bad, stand_in=lambda: first_readable_sample(job.spans, skip_bad))
        stream = choose_task(stream, job.probs, job.task_seed, job.task_epoch)
        stream = build_prompts(stream, self.case_captions)
        return tokenize(stream, self.tokenizer, self.cfg.max_seq_len, self.num_image_tokens)

    def _batches(self, job: WorkerJob) -> Iterator[dict]:
        # Resume: whole windows are skipped before decoding, the rest of a window after balancing.
        window, bs = self.cfg.balance_window, job.batch_size
        whole, rest = divmod(job.skip_batches, window)
        examples = self._examples(job, skip_samples=whole * window * bs)
        return collate(windowed_batches(examples, bs, window, self.num_image_tokens + 1, rest), self.pad_id,
                       self.num_image_tokens,
                       self.cfg.packed, self.cfg.max_seq_len)

    def _dataloader(self, jobs: list[WorkerJob]) -> DataLoader:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers + Rust threads
        nw = self.num_workers
        return DataLoader(_JobsDataset(jobs, self._batches), batch_size=None, num_workers=nw,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False,
                          prefetch_factor=4 if nw > 0 else None, worker_init_fn=_worker_init if nw > 0 else None)

    # -- public ---------------------------------------------------------------------------------

    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The batches of `epoch` on this rank, after the first `skip_batches` (exact resume)."""
        spans, workers = self._train_plan(epoch)
        probs = phase_at(self.phases, epoch).probs
        return self._dataloader(self._jobs(spans, workers, skip_batches, epoch, probs, self.seed, shuffle=True,
                                           batch_size=self.batch_size_of(epoch)))

    @property
    def val_probs(self) -> dict:
        return {t: 1.0 / len(self.tasks) if t in self.tasks else 0.0 for t in TASKS}

    def _val_spans(self) -> list[ShardSpan]:
        return lay_out(self.val_shards, self.shard_sha256)

    def val_loader(self) -> Iterable[dict]:
        """Held-out batches: the first --val-max-samples val samples (manifest order), split over
        ranks like the train set, each with a fixed task drawn uniformly over the trained tasks."""
        if self.num_val_samples == 0:
            return []
        workers = plan_rank(self.num_val_samples, self.rank, self.world_size, self.num_workers, self.val_batch_size)
        return self._dataloader(self._jobs(self._val_spans(), workers, 0, 0, self.val_probs, VAL_TASK_SEED,
                                           shuffle=False, batch_size=self.val_batch_size))

    def val_items(self, num: int) -> list[TrainItem]:
        """The first `num` val examples as TrainItems (same tasks as val_loader), for sample logs."""
        n = min(num, sum(n for _, n in self.val_shards))
        if n <= 0:
            return []
        job = WorkerJob(tuple(self._val_spans()), WorkerRange(range(n), None, 1), 0, 0, 0, self.val_probs,
                        VAL_TASK_SEED, 0)
        return [TrainItem(ex.tokens, ex.sample.latent, ex.sample.cond_id, ex.sample.block_tokens, key=ex.sample.key)
                for ex in self._examples(job) if ex.tokens is not None]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token id")
    return pad


def build_stream(manifest, tokenizer, data_cfg: DataConfig, phases: Sequence[Phase], num_image_tokens: int,
                 rank: int = 0, world_size: int = 1, seed: int = 42) -> TrainStream:
    """A TrainStream over `data_cfg.shard_dir` (convenience for eval, benchmarks and tests)."""
    return TrainStream(manifest, data_cfg.shard_dir, tokenizer, data_cfg, phases, num_image_tokens,
                       rank, world_size, seed)
