"""Build WebDataset shards with cached Stage1 outputs from Gemini JSON + GIFs.

    python -m data_prep.build_shards --gemini-json a.json b.json --image-root WeatherQA \\
        --stage1-encoder-ckpt enc.pt --stage1-classifier-ckpt cls.pt \\
        --stage1-trainable-blocks 1 --out shards/

What it does, in order:
1. Load and validate the JSON (bad cases/elements go to the skip report), give each case its split
   (a hash of the case id, so a case never straddles train and val).
2. Make a FIXED plan: elements ordered by (split, case order, element index), cut into shards of
   `--samples-per-shard` (`train-000000.tar`, ..., `val-000000.tar`, ...). The plan depends on the
   inputs and the config only, never on the node layout or timing, and within a shard Stage1 runs on
   fixed batches of the plan, so any layout (1 process, N nodes, a resumed build) writes the same bytes.
3. For each shard this node owns: decode its images in worker processes (a torch DataLoader over
   plan batches, bounded prefetch; workers ship resized uint8 pixels, normalised on the Stage1
   device), run Stage1 batched under `torch.inference_mode` (bf16 autocast on GPU; one batch in
   flight while the previous one is written), write samples with `data_prep.shard_format.encode_sample` into a temp tar with fixed tar
   metadata, rename it into place when complete, then write its sidecar `.build/<shard>.json`
   (sha256, size, sample count, image skips, plan fingerprint). An image that cannot be decoded
   (missing, empty, corrupt, bad frame) is left out of its shard and recorded, never a crash.
4. Finalize when every planned shard is present: `cases.jsonl` (task D), `skip_report.json`,
   `cond_name_to_id.json`, `build_config.json`, and `manifest.json` last.

Checks that fail the build (one message naming the inputs, counts and top skip reasons; exit 1, no
traceback from the CLI):
- Sample-key collisions, before anything is written: two case ids that differ only in characters
  the sample key replaces (`2018.md0101`, `2018_md0101`) would give one WebDataset key to two samples.
- Too much skipped: if more than `--max-skipped-fraction` (default 0.5) of the input elements (the
  JSON's elements, valid or not) are not in the shards, or none is, finalize writes
  `skip_report.json` but no `manifest.json`. Checked over the whole build (a node without shards is
  fine), and once early, from the JSON alone, so an all-invalid JSON fails before Stage1 runs.
  Finished shards stay; rerunning with fixed inputs resumes (a shard whose skipped images now
  resolve elsewhere, e.g. after fixing `--image-root`, or were missing and now exist, is rebuilt),
  and `--max-skipped-fraction 1.0` accepts any build, even an empty one.

Resuming: rerun the same command. Shards whose sidecar matches the plan and whose bytes match the
recorded sha256 are kept; missing, truncated or stale ones are rebuilt. A killed build resumes to
the same shards and manifest as a clean one.

Several nodes / GPUs (shard i is built by node i % num_nodes):
- SLURM job array: `sbatch --array=0-3 launch/build_shards.sbatch <flags>`; each array task is one
  node: `--num-nodes/--node-rank` default to SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID. An array
  task that runs several processes (srun, e.g. one per GPU) counts as SLURM_NTASKS nodes, process
  SLURM_PROCID being node array_index * SLURM_NTASKS + SLURM_PROCID.
- By hand, e.g. one process per GPU on one machine:
  `for r in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$r python -m data_prep.build_shards ... --num-nodes 4 --node-rank $r & done; wait`.
The last node to finish writes the manifest (each node checks after writing its own shards). If
nodes run on machines whose view of the output folder lags, run once more with `--finalize-only`
after all of them finished: it only assembles the manifest (and fails naming missing shards).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from common.cli import UserError, cli_main
from common.config import config_to_dict, parse_config, print_config, save_config
from common.io import atomic_write_json, atomic_write_text, sha256_file
from common.log import setup_logging
from common.runtime import SlurmTask, resolve_device, resolve_precision, slurm_task
from data_prep.gemini import Case, Element, Skip, SkipReport, assign_split, load_gemini_json, resolve_image_path
from data_prep.images import ImageDecodeError, Stats, decode_image_uint8, normalization, normalize_coefficients
from data_prep.manifest import (
    BUILD_CONFIG_FILENAME,
    SKIP_REPORT_FILENAME,
    SPLITS,
    Manifest,
    ShardEntry,
    Stage1Record,
    save_manifest,
)
from data_prep.shard_format import CASES_FILENAME, MANIFEST_FILENAME, ElementSample, encode_sample, sample_key
from models.cond_names import COND_MAP_FILENAME, default_cond_name_to_id, load_cond_map, save_cond_map
from models.stage1 import Stage1Settings, load_stage1_classifier, load_stage1_encoder

log = logging.getLogger("data_prep.build_shards")

BUILD_DIR = ".build"  # per-shard sidecars and per-node records live here, inside --out
TAR_MTIME = 0  # fixed tar metadata: rebuilt shards are byte-identical
TAR_OWNER = "stage2"

# Config fields that do not change what is written (paths of the run, layout, workers, the outcome
# check); the others do, and are recorded in the manifest and the shards' fingerprints.
_LAYOUT_FIELDS = ("out", "num_workers", "device", "num_nodes", "node_rank", "finalize_only", "max_skipped_fraction")


class BuildError(UserError, RuntimeError):
    """An expected failure; its message says what is wrong and what to do. `main` prints it (no
    traceback) and exits 1."""


class InputError(BuildError, ValueError):
    """Unusable inputs or flags: a missing/invalid Gemini JSON or checkpoint, a `--strict` problem,
    a sample-key collision (also a ValueError, as such problems were before)."""


def _accept_flat_stage1_kwargs(cls):
    """Let `BuildConfig(image_size=32, stage1_encoder_ckpt=...)` fill the nested Stage1Settings.

    The nested field keeps one definition of the Stage1 flags (shared with the trainer and eval);
    flat keyword arguments mirror the flat CLI flags.
    """
    generated_init = cls.__init__
    stage1_names = {f.name for f in dataclasses.fields(Stage1Settings)}

    def __init__(self, *args, stage1: Optional[Stage1Settings] = None, **kwargs):
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in stage1_names}
        stage1 = dataclasses.replace(stage1 or Stage1Settings(), **flat)
        generated_init(self, *args, stage1=stage1, **kwargs)

    __init__.__doc__ = generated_init.__doc__
    cls.__init__ = __init__
    return cls


@_accept_flat_stage1_kwargs
@dataclass
class BuildConfig:
    """Build WebDataset shards with cached Stage1 latents from Gemini JSON + GIFs (resumable, multi-node; see module docs)."""

    stage1: Stage1Settings = field(default_factory=Stage1Settings)
    gemini_json: list[str] = field(default_factory=list, metadata={"help": "Gemini JSON file(s), in this order"})
    image_root: str = field(default="", metadata={"help": "folder that holds md_image/ (image_rel_path is resolved against it)"})
    out: str = field(default="", metadata={"help": "shard directory to write (created; reruns resume in it)"})
    samples_per_shard: int = field(default=1000, metadata={"help": "elements planned per shard (skipped images make a shard smaller)"})
    num_workers: int = field(default=4, metadata={"help": "image-decoding worker processes (0 = decode in the main process)"})
    batch_size: int = field(default=64, metadata={"help": "Stage1 inference batch (also part of the plan: keep it fixed when resuming)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (auto: cuda if available, one GPU per local SLURM task)"})
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={"help": "Stage1 compute dtype (auto: bf16 autocast on GPU, fp32 on CPU)"})
    strict: bool = field(default=False, metadata={"help": "stop at the first bad JSON field or image instead of skipping it"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of cases (by case-id hash) in the val split"})
    split_seed: int = field(default=0, metadata={"help": "seed of the case-id hash that assigns splits"})
    keep_images: bool = field(default=False, metadata={"help": "also store the raw GIF bytes in each sample"})
    num_nodes: Optional[int] = field(default=None, metadata={"help": "nodes sharing the build (default: SLURM_ARRAY_TASK_COUNT x SLURM_NTASKS, else 1)"})
    node_rank: Optional[int] = field(default=None, metadata={"help": "this node's rank; builds shards i with i % num_nodes == rank (default: from SLURM, else 0)"})
    finalize_only: bool = field(default=False, metadata={"help": "build nothing; write the manifest once all shards exist (fails naming missing ones)"})
    cond_map: str = field(default="", metadata={"help": "cond_name_to_id.json to use ('' = the fixed 20-class map)"})
    max_skipped_fraction: float = field(default=0.5, metadata={"help": "fail (exit 1, skip_report.json written, no manifest.json; finished shards kept) when more than this fraction of the input elements (valid or not) is left out of the shards; an empty build counts as 1.0, so 1.0 accepts any build, even an empty one"})

    def validate(self) -> None:
        if not self.gemini_json:
            raise InputError("--gemini-json: give at least one Gemini JSON file")
        if not self.out:
            raise InputError("--out: give the shard directory to write")
        if not self.finalize_only and not self.image_root:
            raise InputError("--image-root: give the folder that holds md_image/")
        for name in ("stage1_encoder_ckpt", "stage1_classifier_ckpt"):
            if not getattr(self.stage1, name):
                raise InputError(f"--{name.replace('_', '-')}: required (the shards cache Stage1 outputs)")
        if self.samples_per_shard < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise InputError("--samples-per-shard and --batch-size must be >= 1, --num-workers >= 0")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise InputError(f"--max-skipped-fraction {self.max_skipped_fraction}: must be in [0, 1]")
        num_nodes, node_rank = resolve_layout(self)
        if not 0 <= node_rank < num_nodes:
            raise InputError(f"--node-rank {node_rank} must be in [0, --num-nodes {num_nodes})")


# ----------------------------------------------------------------------------------------------
# Layout and device


def resolve_layout(cfg: BuildConfig) -> tuple[int, int]:
    """(num_nodes, node_rank): explicit flags, else SLURM job array x tasks, else (1, 0)."""
    slurm = slurm_task() or SlurmTask(procid=0, ntasks=1, localid=0, array_index=0, array_count=1, nodelist="",
                                      job_id=0)
    num_nodes = cfg.num_nodes if cfg.num_nodes is not None else slurm.array_count * slurm.ntasks
    node_rank = cfg.node_rank if cfg.node_rank is not None else slurm.array_index * slurm.ntasks + slurm.procid
    return num_nodes, node_rank


def normalize_pixels(pixels, mean: Stats = None, std: Stats = None):
    """torch uint8 [..., 3, H, W] -> float32, exactly `preprocess`'s formula (on any device).

    The shard builder's workers ship uint8 pixels (4x less through shared memory, pinning and the
    host-to-device copy than float32) and normalise here, on the GPU.
    """
    scale, shift = (torch.from_numpy(a).to(pixels.device).view(3, 1, 1) for a in normalize_coefficients(mean, std))
    return pixels.float() * scale + shift


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlannedShard:
    index: int  # position in the global plan; node index % num_nodes builds it
    name: str
    split: str
    items: list[tuple[Case, Element]]

    def batches(self, batch_size: int) -> list[list[tuple[Case, Element]]]:
        """The fixed Stage1 batches of this shard (part of the plan: see the module docs)."""
        return [self.items[i:i + batch_size] for i in range(0, len(self.items), batch_size)]

    def fingerprint(self, build_fingerprint: str) -> str:
        """Identifies this shard's planned content; a sidecar with another one is stale."""
        h = hashlib.sha256(build_fingerprint.encode())
        h.update(self.name.encode())
        for case, el in self.items:
            h.update(json.dumps([case.case_id, case.split, case.global_summary, el.index,
                                 el.image_rel_path, el.cond_id, el.caption]).encode())
        return h.hexdigest()


def make_plan(cases: Sequence[Case], samples_per_shard: int) -> list[PlannedShard]:
    """Elements in (split, case order, element index) order, cut into shards per split."""
    plan: list[PlannedShard] = []
    for split in SPLITS:
        items = [(c, el) for c in cases if c.split == split for el in c.elements]
        for k, start in enumerate(range(0, len(items), samples_per_shard)):
            plan.append(PlannedShard(len(plan), f"{split}-{k:06d}.tar", split,
                                     items[start:start + samples_per_shard]))
    return plan


def content_config(cfg: BuildConfig) -> dict:
    """The config fields that determine the shards' bytes (recorded in the manifest)."""
    d = config_to_dict(cfg)
    for name in _LAYOUT_FIELDS:
        d.pop(name, None)
    return d


def build_fingerprint(cfg: BuildConfig, ckpt_sha: tuple[str, str], compute_dtype: str) -> str:
    d = content_config(cfg)
    d["stage1"] = {k: v for k, v in d["stage1"].items() if not k.endswith("_ckpt")}
    d.update(image_root=None, gemini_json=None, encoder_sha256=ckpt_sha[0],
             classifier_sha256=ckpt_sha[1], compute_dtype=compute_dtype,
             normalization=normalization())
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Decoding (runs in DataLoader worker processes)


@dataclass
class DecodedBatch:
    shard_index: int
    batch_index: int
    ok: list[int]  # positions in the plan batch whose image decoded
    pixels: torch.Tensor  # uint8 [len(ok), 3, H, W], normalised by Stage1Runner on its device
    failures: list[tuple[int, str, str, str]]  # (position, path, reason, detail)
    image_bytes: list[Optional[bytes]]  # per ok position (keep_images), else Nones

    def pin_memory(self) -> "DecodedBatch":
        """Called by the DataLoader's pin-memory thread (GPU builds): async host-to-device copies."""
        self.pixels = self.pixels.pin_memory()
        return self


class _DecodeJobs(torch.utils.data.Dataset):
    """Item i = the i-th plan batch of this node, decoded. Workers see only paths and ints."""

    def __init__(self, jobs: list[tuple[int, int, list[str]]], image_size: int, frame: int,
                 keep_images: bool):
        self.jobs, self.image_size, self.frame, self.keep_images = jobs, image_size, frame, keep_images

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> DecodedBatch:
        shard_index, batch_index, paths = self.jobs[i]
        ok, arrays, failures, raw = [], [], [], []
        for pos, path in enumerate(paths):
            try:
                arrays.append(decode_image_uint8(path, self.image_size, self.frame))
            except ImageDecodeError as e:
                failures.append((pos, e.path, e.reason, e.detail))
                continue
            ok.append(pos)
            raw.append(Path(path).read_bytes() if self.keep_images else None)
        shape = (0, 3, self.image_size, self.image_size)
        pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(shape, dtype=torch.uint8)
        return DecodedBatch(shard_index, batch_index, ok, pixels, failures, raw)


def _no_collate(item):
    return item


# ----------------------------------------------------------------------------------------------
# Stage1


@dataclass
class Stage1Result:
    """Stage1 outputs on the host (fp16), valid once `event` (None on CPU) has completed."""
    tensors: list  # latent, logits[, tokens]
    event: Optional[object]

    def numpy(self):
        if self.event is not None:
            self.event.synchronize()
        arrays = [t.numpy() for t in self.tensors]
        return arrays[0], arrays[1], (arrays[2] if len(arrays) > 2 else None)


class Stage1Runner:
    """Frozen Stage1 encoder + classifier: pixels -> fp16 latent, logits, block tokens."""

    def __init__(self, settings: Stage1Settings, device: torch.device, compute_dtype: str):
        self.settings, self.device = settings, device
        self.encoder = load_stage1_encoder(settings.stage1_encoder_ckpt, settings.latent_pooling)
        self.classifier = load_stage1_classifier(settings.stage1_classifier_ckpt)
        self.encoder.to(device).eval()
        self.classifier.to(device).eval()
        self.autocast = _AUTOCAST_DTYPES.get(compute_dtype)

    @torch.inference_mode()
    def launch(self, pixels: torch.Tensor) -> "Stage1Result":
        """Queue Stage1 on a batch (uint8 or normalised float pixels) without waiting for it.

        On a GPU the outputs are copied into pinned host memory asynchronously and an event marks
        their arrival, so the caller can write the previous batch while this one computes.
        """
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(pixels)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            latent, tokens = self.encoder.encode(pixels, trainable_blocks=self.settings.stage1_trainable_blocks)
            logits = self.classifier(pixels)
        logits = getattr(logits, "logits", logits)
        outputs = [latent, logits] + ([] if tokens is None else [tokens])
        if self.device.type != "cuda":
            return Stage1Result([t.to(torch.float16) for t in outputs], None)
        host = [torch.empty(t.shape, dtype=torch.float16, pin_memory=True) for t in outputs]
        for dst, src in zip(host, outputs):
            dst.copy_(src.to(torch.float16), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Stage1Result(host, event)

    def __call__(self, pixels: torch.Tensor):
        """Stage1 on a batch, waited for: (latent, logits, tokens or None) as fp16 numpy arrays."""
        return self.launch(pixels).numpy()

    def shapes(self) -> tuple[int, int]:
        """(latent_dim, tokens per image; 0 when K == 0), from one blank image."""
        size = self.settings.image_size
        latent, _, tokens = self(torch.zeros(1, 3, size, size))
        return latent.shape[-1], (0 if tokens is None else tokens.shape[1])


# ----------------------------------------------------------------------------------------------
# Writing one shard


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class ShardWriter:
    """Writes one shard to a temp name; `commit()` renames it into place and returns its entry."""

    def __init__(self, out: Path, shard: PlannedShard):
        self.out, self.shard = out, shard
        self.path = out / shard.name
        self.tmp = out / f".{shard.name}.{os.getpid()}.tmp"
        self.file = open(self.tmp, "wb")
        self.hashing = _HashingFile(self.file)
        self.tar = wds.TarWriter(self.hashing, encoder=False, mtime=TAR_MTIME, user=TAR_OWNER,
                                 group=TAR_OWNER, mode=0o444)
        self.num_samples = 0
        self.skips: list[Skip] = []

    def write(self, sample: ElementSample) -> None:
        self.tar.write(encode_sample(sample))
        self.num_samples += 1

    def commit(self) -> ShardEntry:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return ShardEntry(self.shard.name, self.shard.split, self.num_samples,
                          self.hashing.sha.hexdigest(), self.hashing.size)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _sidecar_path(out: Path, name: str) -> Path:
    return out / BUILD_DIR / f"{name}.json"


def read_done_shard(out: Path, shard: PlannedShard, fingerprint: str, full: bool) -> Optional[dict]:
    """The shard's sidecar if it matches the plan and the file (size; sha256 if `full`), else None."""
    try:
        side = json.loads(_sidecar_path(out, shard.name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if side.get("fingerprint") != fingerprint:
        return None
    path = out / shard.name
    if not path.exists() or path.stat().st_size != side.get("size"):
        return None
    if full and sha256_file(path) != side.get("sha256"):
        return None
    return side


# ----------------------------------------------------------------------------------------------
# The build


@dataclass
class _Inputs:
    cases: list[Case]
    report: SkipReport
    cond_map: dict[str, int]
    plan: list[PlannedShard]
    ckpt_sha: tuple[str, str]


def _load_inputs(cfg: BuildConfig) -> _Inputs:
    try:
        cond_map = load_cond_map(cfg.cond_map) if cfg.cond_map else default_cond_name_to_id()
        cases, report = load_gemini_json(cfg.gemini_json, cond_map, strict=cfg.strict)
    except (FileNotFoundError, ValueError) as e:  # the message names the file (and case/field)
        raise InputError(str(e)) from e
    check_sample_keys(cases)
    for case in cases:
        case.split = assign_split(case.case_id, cfg.val_fraction, cfg.split_seed)
    ckpt_sha = tuple(_ckpt_sha(cfg.stage1, name) for name in ("stage1_encoder_ckpt", "stage1_classifier_ckpt"))
    return _Inputs(cases, report, cond_map, make_plan(cases, cfg.samples_per_shard), ckpt_sha)


def _ckpt_sha(settings: Stage1Settings, name: str) -> str:
    path = getattr(settings, name)
    try:
        return sha256_file(path)
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"--{name.replace('_', '-')} {path}: no such file") from None


def check_sample_keys(cases: Sequence[Case]) -> None:
    """Raise InputError if two elements would get the same sample key (`shard_format.sample_key`).

    The key keeps letters, digits, '-' and '_' of the case id and replaces the rest with '_', so ids
    such as `2018.md0101` and `2018_md0101` collide; WebDataset would then merge two samples into
    one that the trainer cannot decode. Keys are not changed to avoid it: existing shard sets keep
    theirs, and which of two ids to rename is the user's call.
    """
    owner: dict[str, Case] = {}
    collisions: dict[tuple[int, int], tuple[Case, Case, str]] = {}  # first per pair of cases
    for case in cases:
        for el in case.elements:
            key = sample_key(case.case_id, el.index)
            first = owner.setdefault(key, case)
            if first is not case:
                collisions.setdefault((id(first), id(case)), (first, case, key))
    if not collisions:
        return
    lines = [f"  case id {a.case_id!r} ({a.source_file}, case {a.case_index}) and case id {b.case_id!r} "
             f"({b.source_file}, case {b.case_index}): both give sample key {key!r}"
             for a, b, key in list(collisions.values())[:5]]
    more = f"\n  ... and {len(collisions) - 5} more pair(s)" if len(collisions) > 5 else ""
    raise InputError(
        f"{len(collisions)} pair(s) of case ids collide as sample keys (a key keeps letters, digits, '-' "
        f"and '_' of the case id and replaces every other character with '_'; one WebDataset key cannot "
        f"hold two samples):\n" + "\n".join(lines) + more +
        "\nGive one case of each pair another id in its Gemini JSON (e.g. a \"case_id\" field) and rerun; "
        "no shard was written.")


def _sample(case: Case, el: Element, latent, logits, tokens, image_bytes) -> ElementSample:
    return ElementSample(
        case_id=case.case_id, element_index=el.index, split=case.split, cond_name=el.cond_name,
        cond_id=el.cond_id, caption=el.caption, global_summary=case.global_summary,
        latent=latent, cls_logits=logits, image_rel_path=el.image_rel_path,
        source_file=case.source_file, pred_cond_id=int(np.argmax(logits)), block_tokens=tokens,
        image_bytes=image_bytes)


_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _image_skip(case: Case, el: Element, path: str, reason: str, detail: str) -> Skip:
    # PIL messages may name an object address ("<_io.BytesIO object at 0x7f...>"): drop it, so
    # that the skip report, like the shards, is the same on every run.
    return Skip(case.source_file, case.case_index, el.index, "image_rel_path", reason, path=path,
                detail=_OBJECT_ADDRESS.sub("", detail))


# Public name of the helper above: eval.inputs records its JSON input's image skips with it.
image_skip = _image_skip


def _build_shards(cfg: BuildConfig, todo: list[PlannedShard], fingerprints: dict, runner: Stage1Runner,
                  device: torch.device) -> tuple[int, int]:
    """Decode, encode and write the `todo` shards; returns (images processed, images skipped)."""
    out = Path(cfg.out)
    jobs, plan_batches = [], {}
    for shard in todo:
        batches = shard.batches(cfg.batch_size)
        plan_batches[shard.index] = batches
        for b, items in enumerate(batches):
            jobs.append((shard.index, b, [str(resolve_image_path(cfg.image_root, el.image_rel_path))
                                          for _, el in items]))
    dataset = _DecodeJobs(jobs, cfg.stage1.image_size, cfg.stage1.gif_frame, cfg.keep_images)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
        collate_fn=_no_collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers > 0 else None, persistent_workers=False)
    by_index = {s.index: s for s in todo}
    total = sum(len(s.items) for s in todo)
    writer: Optional[ShardWriter] = None
    num_skipped = 0
    bar = tqdm(total=total, unit="img", desc=f"node {cfg.node_rank}", dynamic_ncols=True, smoothing=0.1)
    # One batch in flight: Stage1 of batch i runs on the GPU while batch i-1 is written here.
    in_flight: Optional[tuple] = None  # (decoded, Stage1Result, shard, items)

    def write_encoded(decoded: DecodedBatch, result: Stage1Result, shard: PlannedShard, items) -> None:
        nonlocal writer
        latents, logits, tokens = result.numpy()
        for j, pos in enumerate(decoded.ok):
            case, el = items[pos]
            writer.write(_sample(case, el, latents[j], logits[j],
                                 None if tokens is None else tokens[j], decoded.image_bytes[j]))
        if decoded.batch_index == len(plan_batches[shard.index]) - 1:
            _commit_shard(out, writer, fingerprints[shard.name])
            writer = None

    try:
        for decoded in loader:
            shard = by_index[decoded.shard_index]
            items = plan_batches[shard.index][decoded.batch_index]
            launched = runner.launch(decoded.pixels) if decoded.ok else None
            if in_flight is not None:
                write_encoded(*in_flight)
                in_flight = None
            if decoded.batch_index == 0:
                writer = ShardWriter(out, shard)
                bar.set_postfix_str(shard.name)
            for pos, path, reason, detail in decoded.failures:
                case, el = items[pos]
                skip = _image_skip(case, el, path, reason, detail)
                if cfg.strict:
                    raise InputError(f"--strict: {skip.message()}")
                writer.skips.append(skip)
                num_skipped += 1
            if launched is not None:
                in_flight = (decoded, launched, shard, items)
            elif decoded.batch_index == len(plan_batches[shard.index]) - 1:
                _commit_shard(out, writer, fingerprints[shard.name])
                writer = None
            bar.update(len(items))
        if in_flight is not None:
            write_encoded(*in_flight)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    return total, num_skipped


def _skipped_images_may_decode_now(side: dict, shard: PlannedShard, image_root: str) -> bool:
    """True if an image the shard left out now resolves to another path (e.g. `--image-root` was
    fixed) or was missing and now exists: the shard is rebuilt rather than kept.

    The image root is not part of the plan (the same images may be mounted elsewhere on another
    machine), so without this a build made with a wrong root would be resumed as it was.
    """
    elements = {(case.source_file, case.case_index, el.index): el for case, el in shard.items}
    for skip in side.get("skips", []):
        el = elements.get((skip["file"], skip["case_index"], skip["element_index"]))
        if el is None:
            continue
        path = resolve_image_path(image_root, el.image_rel_path)
        if str(path) != skip["path"] or (skip["reason"] == "missing" and path.exists()):
            return True
    return False


def _remove_stale_temp_files(out: Path, shards: list[PlannedShard]) -> None:
    """Temp tars left by a killed run of this node (only its own shards: others may be writing)."""
    for shard in shards:
        for tmp in out.glob(f".{shard.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _commit_shard(out: Path, writer: ShardWriter, fingerprint: str) -> None:
    entry = writer.commit()
    record = {**dataclasses.asdict(entry), "fingerprint": fingerprint,
              "skips": [dataclasses.asdict(s) for s in writer.skips]}
    atomic_write_json(_sidecar_path(out, entry.name), record)


def build(cfg: BuildConfig) -> Optional[Manifest]:
    """Build this node's shards; return the manifest if this call completed the build, else None."""
    cfg.validate()
    num_nodes, node_rank = resolve_layout(cfg)
    cfg = dataclasses.replace(cfg, num_nodes=num_nodes, node_rank=node_rank)
    out = Path(cfg.out)
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    compute_dtype = resolve_precision(cfg.dtype, device)
    inputs = _load_inputs(cfg)
    # Image skips only add to the JSON's: a build that cannot pass fails before Stage1 runs.
    check_skipped_fraction(cfg, inputs.report, sum(len(s.items) for s in inputs.plan), before_images=True)
    fp = build_fingerprint(cfg, inputs.ckpt_sha, compute_dtype)
    fingerprints = {s.name: s.fingerprint(fp) for s in inputs.plan}
    runner = Stage1Runner(cfg.stage1, device, compute_dtype)

    if not cfg.finalize_only:
        _build_my_shards(cfg, inputs.plan, fingerprints, runner, device, compute_dtype)

    missing = [s.name for s in inputs.plan if read_done_shard(out, s, fingerprints[s.name], full=False) is None]
    if missing:
        msg = (f"{len(missing)} of {len(inputs.plan)} shards are not built yet "
               f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if cfg.finalize_only:
            raise BuildError(f"{out}: cannot finalize: {msg}; run the build on every node first")
        log.info("%s: the node that finishes last writes the manifest", msg)
        return None
    return finalize(cfg, inputs, fingerprints, runner, compute_dtype)


def _build_my_shards(cfg: BuildConfig, plan: list[PlannedShard], fingerprints: dict, runner: Stage1Runner,
                     device: torch.device, compute_dtype: str) -> None:
    """Build the shards of this node that are missing, broken or stale; record what was done."""
    out = Path(cfg.out)
    mine = [s for s in plan if s.index % cfg.num_nodes == cfg.node_rank]
    todo = [s for s in mine if (side := read_done_shard(out, s, fingerprints[s.name], full=True)) is None
            or _skipped_images_may_decode_now(side, s, cfg.image_root)]
    log.info("node %d/%d: %d of %d planned shards are mine, %d to build (%d already done), device %s, %s",
             cfg.node_rank, cfg.num_nodes, len(mine), len(plan), len(todo), len(mine) - len(todo),
             device, compute_dtype)
    if todo:
        # The directory no longer holds a finished build: readers must not trust an old manifest.
        (out / MANIFEST_FILENAME).unlink(missing_ok=True)
        _remove_stale_temp_files(out, todo)
    start = time.perf_counter()
    num_images, num_skipped = _build_shards(cfg, todo, fingerprints, runner, device) if todo else (0, 0)
    seconds = time.perf_counter() - start
    atomic_write_json(out / BUILD_DIR / f"node-{cfg.node_rank}-of-{cfg.num_nodes}.json", {
        "node_rank": cfg.node_rank, "num_nodes": cfg.num_nodes, "shards": [s.name for s in mine],
        "built": [s.name for s in todo], "images": num_images, "images_skipped": num_skipped,
        "seconds": round(seconds, 3), "images_per_s": round(num_images / seconds, 1) if num_images else None,
        "device": str(device)})
    if num_images:
        log.info("node %d: %d images in %.1f s (%.1f images/s), %d image(s) skipped", cfg.node_rank,
                 num_images, seconds, num_images / seconds, num_skipped)


# ----------------------------------------------------------------------------------------------
# Finalize


def finalize(cfg: BuildConfig, inputs: _Inputs, fingerprints: dict, runner: Stage1Runner,
             compute_dtype: str) -> Manifest:
    """Assemble cases.jsonl, the skip report, the cond map, the build config and the manifest."""
    out = Path(cfg.out)
    sidecars = [read_done_shard(out, s, fingerprints[s.name], full=False) for s in inputs.plan]
    _warn_about_stray_shards(out, inputs.plan)
    # JSON skips first, then image skips in plan order: the same report for every node layout.
    report = SkipReport().merge(inputs.report)
    for side in sidecars:
        for skip in side["skips"]:
            report.add(Skip(**skip))
    check_skipped_fraction(cfg, report, sum(side["num_samples"] for side in sidecars), before_images=False)
    cases_per_split = _write_cases(out / CASES_FILENAME, inputs.cases, report)

    shards = [ShardEntry(s["name"], s["split"], s["num_samples"], s["sha256"], s["size"]) for s in sidecars]
    split_counts = {split: {"num_samples": sum(s.num_samples for s in shards if s.split == split),
                            "num_shards": sum(s.split == split for s in shards),
                            "num_cases": cases_per_split[split]} for split in SPLITS}
    builder = {**content_config(cfg), "compute_dtype": compute_dtype}
    manifest = Manifest(shards=shards, split_counts=split_counts,
                        stage1=_stage1_record(cfg.stage1, inputs.ckpt_sha, runner),
                        cond_name_to_id=inputs.cond_map, cases_file=CASES_FILENAME,
                        skip_summary=report.summary(), skip_report_file=SKIP_REPORT_FILENAME, builder=builder)
    report.save(out / SKIP_REPORT_FILENAME)
    save_cond_map(out / COND_MAP_FILENAME, inputs.cond_map)
    atomic_write_json(out / BUILD_CONFIG_FILENAME, builder)
    save_manifest(out, manifest)  # last: its presence means the build is complete
    _print_summary(out, manifest, report)
    return manifest


def check_skipped_fraction(cfg: BuildConfig, report: SkipReport, num_kept: int, before_images: bool) -> None:
    """Raise BuildError if more than `cfg.max_skipped_fraction` of the input elements is not kept.

    `num_kept`: the samples in the shards (`before_images`: the elements the JSON leaves, an upper
    bound). An empty build counts as fraction 1.0. On failure the skip report is written (every
    skip, for the user to read) and a manifest from an earlier run is removed; shards stay.
    """
    num_read = report.elements_read
    fraction = 1.0 if num_kept == 0 else (num_read - num_kept) / num_read
    if fraction <= cfg.max_skipped_fraction:
        return
    out = Path(cfg.out)
    (out / MANIFEST_FILENAME).unlink(missing_ok=True)
    report.save(out / SKIP_REPORT_FILENAME)
    raise BuildError(_rejection_message(cfg, report, num_kept, fraction, before_images))


def _rejection_message(cfg: BuildConfig, report: SkipReport, num_kept: int, fraction: float,
                       before_images: bool) -> str:
    num_read, out = report.elements_read, Path(cfg.out)
    counts = (f"{num_kept} of {num_read} input element(s) (from {report.cases_read} case(s)) "
              f"{'left after validating the Gemini JSON' if before_images else 'kept'}, "
              f"{num_read - num_kept} skipped")
    if num_read == 0:
        limit = "the Gemini JSON holds no case: the build would be empty"
    elif num_kept == 0:
        limit = "every element skipped: the build would be empty"
    else:
        limit = f"{fraction:.1%} skipped > --max-skipped-fraction {cfg.max_skipped_fraction:g}"
    lines = [f"build rejected{' before decoding any image' if before_images else ''}: {counts} ({limit})",
             f"  Gemini JSON: {', '.join(cfg.gemini_json)}; image root: {cfg.image_root or '-'}; "
             f"GIF frame: {cfg.stage1.gif_frame}"]
    lines += report.explain(cfg.image_root, f"--gif-frame {cfg.stage1.gif_frame}")
    lines += [f"  every skip: {out / SKIP_REPORT_FILENAME}; no {MANIFEST_FILENAME} written; finished shards "
              "stay (a rerun keeps them, and rebuilds those whose skipped images are now found)",
              "Fix the input and rerun the same command, or accept such a build with --max-skipped-fraction "
              "1.0 (or the largest fraction you accept)."]
    return "\n".join(lines)


def _write_cases(path: Path, cases: list[Case], report: SkipReport) -> Counter:
    """cases.jsonl for task D: each case with a sample in the shards, its kept captions in element order.

    Returns the number of cases written per split.
    """
    image_skipped = {(s.file, s.case_index, s.element_index) for s in report if s.field == "image_rel_path"}
    per_split, lines = Counter(), []
    for case in cases:
        kept = [el for el in case.elements if (case.source_file, case.case_index, el.index) not in image_skipped]
        if not kept:
            continue
        per_split[case.split] += 1
        lines.append(json.dumps({"case_id": case.case_id, "split": case.split,
                                 "global_summary": case.global_summary,
                                 "captions": [el.caption for el in kept],
                                 "element_indices": [el.index for el in kept]}, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return per_split


def _stage1_record(settings: Stage1Settings, ckpt_sha: tuple[str, str], runner: Stage1Runner) -> Stage1Record:
    latent_dim, num_tokens = runner.shapes()
    mean, std = normalization()
    return Stage1Record(encoder_sha256=ckpt_sha[0], classifier_sha256=ckpt_sha[1],
                        image_size=settings.image_size, trainable_blocks=settings.stage1_trainable_blocks,
                        pooling=settings.latent_pooling, latent_dim=latent_dim, frame=settings.gif_frame,
                        normalization={"mean": list(mean), "std": list(std)}, num_tokens=num_tokens)


def _warn_about_stray_shards(out: Path, plan: list[PlannedShard]) -> None:
    planned = {s.name for s in plan}
    strays = sorted(p.name for p in out.glob("*.tar") if p.name not in planned)
    if strays:
        log.warning("%s: %d shard file(s) left by an earlier build with another plan are not in the "
                    "manifest: %s", out, len(strays), ", ".join(strays[:5]))


def _print_summary(out: Path, manifest: Manifest, report: SkipReport, file=None) -> None:
    file = file or sys.stdout
    counts = ", ".join(f"{split}: {c['num_samples']} samples / {c['num_cases']} cases / {c['num_shards']} shards"
                       for split, c in manifest.split_counts.items())
    num_kept = sum(c["num_samples"] for c in manifest.split_counts.values())
    print(f"[build_shards] wrote {out / 'manifest.json'} ({counts}; {num_kept} of {report.elements_read} "
          "input elements kept)", file=file)
    if len(report):
        reasons = ", ".join(f"{r}: {n}" for r, n in report.by_reason().items())
        print(f"[build_shards] skipped {report.num_cases_skipped()} case(s) and "
              f"{report.num_elements_skipped()} element(s) ({reasons}); details in "
              f"{out / SKIP_REPORT_FILENAME}", file=file)
    else:
        print("[build_shards] nothing skipped", file=file)
    file.flush()


CLI_DESCRIPTION = (
    "Build WebDataset shards with cached Stage1 latents from Gemini JSON + GIFs. Rerunning the same "
    "command resumes (finished shards are verified by sha256 and kept). Several nodes/GPUs: run the same "
    "command with --num-nodes N --node-rank k on each (defaults come from a SLURM job array, see "
    "launch/build_shards.sbatch); node k builds shards i with i % N == k, and the last node to finish writes "
    "manifest.json. Where the nodes' view of --out may lag, run --finalize-only once all have finished.")


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    """The CLI. Expected failures (BuildError: bad inputs or flags, a rejected build) print one
    message to stderr and exit 1 without a traceback; anything else is a bug and keeps its traceback."""
    try:
        cfg = parse_config(BuildConfig, argv, description=CLI_DESCRIPTION)
        cfg.num_nodes, cfg.node_rank = resolve_layout(cfg)
        setup_logging("data_prep.build_shards", rank=0)
        print_config(cfg)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.out) / BUILD_DIR / f"config-node-{cfg.node_rank}.json")
        build(cfg)
    except BuildError as e:
        sys.stdout.flush()
        print(f"[build_shards] error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
