"""The shard directory's `manifest.json`: what was built, from what, and how to check it.

The manifest is written once, last, by the shard builder (data_prep/build_shards.py) when every
planned shard is on disk; a directory without one is an unfinished build. Readers (the trainer,
eval) use it to list shards per split, to size epochs without opening tars, and to refuse shards
whose cached Stage1 outputs were made with other Stage1 settings (`check_stage1_compatible`).

    {
      "format_version": 1,
      "shards": [{"name": "train-000000.tar", "split": "train", "num_samples": 1000,
                  "sha256": "...", "size": 123456}, ...],
      "split_counts": {"train": {"num_samples": .., "num_shards": .., "num_cases": ..}, "val": ...},
      "stage1": {"encoder_sha256", "classifier_sha256", "image_size", "trainable_blocks",
                 "pooling", "latent_dim", "num_tokens", "frame", "normalization"},
      "cond_name_to_id": {"shr6": 0, ...},
      "cases_file": "cases.jsonl",
      "skip_summary": {"num_skipped": .., "by_reason": {..}, ...},
      "skip_report_file": "skip_report.json",
      "builder": {...the build config fields that determine the content...}
    }

The manifest holds no timestamps or host names: a resumed, re-run or multi-node build of the same
inputs writes the same bytes as a clean single-process one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from common.io import atomic_write_json, sha256_file
from data_prep.shard_format import CASES_FILENAME, MANIFEST_FILENAME, SHARD_FORMAT_VERSION
from models.cond_names import validate_cond_map

SKIP_REPORT_FILENAME = "skip_report.json"
BUILD_CONFIG_FILENAME = "build_config.json"
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """manifest.json is missing or malformed; the message names the file and the field."""


class ManifestMismatch(ValueError):
    """Shards were built with other Stage1 settings than the run that wants to read them."""

    def __init__(self, source: str, differences: dict[str, tuple[Any, Any]]):
        self.differences = differences
        lines = [f"  {name}: shards built with {built!r}, this run uses {wanted!r}"
                 for name, (built, wanted) in differences.items()]
        super().__init__(
            f"{source}: the shards were built with other Stage1 settings than this run:\n"
            + "\n".join(lines)
            + "\nRebuild the shards (python -m data_prep.build_shards) with this run's Stage1 "
              "settings, or run with the settings the shards were built with.")


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name inside the shard directory, e.g. "train-000000.tar"
    split: str
    num_samples: int
    sha256: str
    size: int = -1  # bytes; -1 when unknown (a quick check before hashing)

    def __getitem__(self, key: str) -> Any:
        """Dict-style access, so code written against the JSON form (`entry["name"]`) works."""
        return getattr(self, key)


@dataclass
class Stage1Record:
    """The Stage1 settings the cached latents were computed with."""

    encoder_sha256: str
    classifier_sha256: str
    image_size: int
    trainable_blocks: int  # K: block tokens entering the last K encoder blocks are cached
    pooling: str
    latent_dim: int
    frame: int  # which GIF frame was decoded
    normalization: dict  # {"mean": [r, g, b], "std": [r, g, b]}
    num_tokens: int = 0  # tokens per image in tokens.npy (0 when K == 0)


@dataclass
class Manifest:
    shards: list[ShardEntry]
    split_counts: dict[str, dict[str, int]]
    stage1: Stage1Record
    cond_name_to_id: dict[str, int]
    cases_file: str = CASES_FILENAME
    skip_summary: dict = field(default_factory=dict)
    skip_report_file: str = SKIP_REPORT_FILENAME
    builder: dict = field(default_factory=dict)
    format_version: int = SHARD_FORMAT_VERSION
    # Where the manifest was read from (not serialised); shard_paths() joins names to it.
    shard_dir: Optional[str] = field(default=None, compare=False, repr=False)

    def entries(self, split: Optional[str] = None) -> list[ShardEntry]:
        return [s for s in self.shards if split is None or s.split == split]

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths of the shards of `split`, in build order."""
        if self.shard_dir is None:
            raise ValueError("manifest has no shard_dir: load it with load_manifest(shard_dir)")
        return [str(Path(self.shard_dir) / s.name) for s in self.entries(split)]

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.entries(split))

    @property
    def cases_path(self) -> Optional[str]:
        return None if self.shard_dir is None else str(Path(self.shard_dir) / self.cases_file)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shard_dir"}
        d["shards"] = [asdict(s) for s in self.shards]
        d["stage1"] = asdict(self.stage1)
        # format_version first: the one field a reader must check before trusting the rest.
        return {"format_version": d.pop("format_version"), **d}


# ----------------------------------------------------------------------------------------------
# Reading with clear errors


def _require(d: dict, key: str, types: type | tuple, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise ManifestError(f"{where}: field {key!r} must be {names}, got {type(value).__name__} {value!r}")
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _parse_shard(d: Any, i: int, source: str) -> ShardEntry:
    where = f"{source}: shards[{i}]"
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    entry = ShardEntry(
        name=_require(d, "name", str, where), split=_require(d, "split", str, where),
        num_samples=_require(d, "num_samples", int, where), sha256=_require(d, "sha256", str, where),
        size=d.get("size", -1) if isinstance(d.get("size", -1), int) else -1)
    if "/" in entry.name or entry.name.startswith("."):
        raise ManifestError(f"{where}: field 'name' must be a plain file name, got {entry.name!r}")
    if entry.num_samples < 0:
        raise ManifestError(f"{where}: field 'num_samples' must be >= 0, got {entry.num_samples}")
    return entry


def _parse_stage1(d: Any, source: str) -> Stage1Record:
    where = f"{source}: stage1"
    if not isinstance(d, dict):
        raise ManifestError(f"{source}: field 'stage1' must be an object")
    types = {"encoder_sha256": str, "classifier_sha256": str, "image_size": int, "trainable_blocks": int,
             "pooling": str, "latent_dim": int, "frame": int, "normalization": dict}
    values = {k: _require(d, k, t, where) for k, t in types.items()}
    values["num_tokens"] = d.get("num_tokens", 0)
    return Stage1Record(**values)


def manifest_from_dict(d: Any, source: str = MANIFEST_FILENAME) -> Manifest:
    if not isinstance(d, dict):
        raise ManifestError(f"{source}: expected a JSON object, got {type(d).__name__}")
    version = _require(d, "format_version", int, source)
    if version != SHARD_FORMAT_VERSION:
        raise ManifestError(f"{source}: field 'format_version' is {version}; this code reads "
                            f"version {SHARD_FORMAT_VERSION} (rebuild the shards)")
    shards = [_parse_shard(s, i, source) for i, s in enumerate(_require(d, "shards", list, source))]
    try:
        cond_map = validate_cond_map(_require(d, "cond_name_to_id", dict, source),
                                     f"{source}: field 'cond_name_to_id'")
    except ValueError as e:
        raise ManifestError(str(e)) from None
    return Manifest(
        shards=shards,
        split_counts=_require(d, "split_counts", dict, source),
        stage1=_parse_stage1(_require(d, "stage1", dict, source), source),
        cond_name_to_id=cond_map,
        cases_file=_require(d, "cases_file", str, source),
        skip_summary=d.get("skip_summary", {}),
        skip_report_file=d.get("skip_report_file", SKIP_REPORT_FILENAME),
        builder=d.get("builder", {}),
        format_version=version,
    )


def load_manifest(shard_dir: str | Path) -> Manifest:
    """Read `<shard_dir>/manifest.json` (a path to the file itself works too)."""
    path = Path(shard_dir)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / MANIFEST_FILENAME
    if not path.exists():
        raise ManifestError(f"{path}: no manifest: the shard build is missing or unfinished "
                            "(run python -m data_prep.build_shards, or its --finalize-only step)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
    manifest = manifest_from_dict(data, str(path))
    manifest.shard_dir = str(path.parent.resolve())
    return manifest


def save_manifest(shard_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(shard_dir) / MANIFEST_FILENAME
    atomic_write_json(path, manifest.to_dict())
    manifest.shard_dir = str(Path(shard_dir).resolve())
    return path


# ----------------------------------------------------------------------------------------------
# Checks


def check_stage1_compatible(manifest: Manifest, settings, encoder_sha256: Optional[str] = None,
                            classifier_sha256: Optional[str] = None) -> None:
    """Raise ManifestMismatch naming every Stage1 setting that differs from the shards'.

    `settings` is a models.stage1.Stage1Settings (image_size, stage1_trainable_blocks,
    latent_pooling, gif_frame). Checkpoint hashes are compared only when given (None: the caller
    does not load Stage1 itself, e.g. K == 0 training that only reads cached latents).
    """
    built = manifest.stage1
    wanted = {
        "image_size": (built.image_size, settings.image_size),
        "stage1_trainable_blocks": (built.trainable_blocks, settings.stage1_trainable_blocks),
        "latent_pooling": (built.pooling, settings.latent_pooling),
        "gif_frame": (built.frame, settings.gif_frame),
    }
    if encoder_sha256 is not None:
        wanted["stage1_encoder_ckpt (sha256)"] = (built.encoder_sha256, encoder_sha256)
    if classifier_sha256 is not None:
        wanted["stage1_classifier_ckpt (sha256)"] = (built.classifier_sha256, classifier_sha256)
    differences = {k: v for k, v in wanted.items() if v[0] != v[1]}
    if differences:
        source = str(Path(manifest.shard_dir) / MANIFEST_FILENAME) if manifest.shard_dir else "manifest"
        raise ManifestMismatch(source, differences)


def verify_shard(shard_dir: str | Path, entry: ShardEntry, full: bool = True) -> bool:
    """True if the shard file exists with the recorded size and (if `full`) sha256."""
    path = Path(shard_dir) / entry.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if entry.size >= 0 and size != entry.size:
        return False
    return not full or sha256_file(path) == entry.sha256
