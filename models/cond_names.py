"""The 20 WeatherQA image types (`cond_name`) and their fixed class ids.

The mapping is fixed once (this order, which is also the Stage1 classifier's output order) and
carried everywhere as `cond_name_to_id.json`: in the shard manifest, in every checkpoint, at
inference. An unknown `cond_name` is an error, never a silently added class.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.io import atomic_write_json

# 18 ingredient parameters, the surface-observation map and the radar composite.
COND_NAMES: tuple[str, ...] = (
    "shr6", "scp", "tadv", "lclh", "epvl", "laps", "mcsm", "rgnlrad", "mcon", "ttd",
    "thea", "swbt", "stor", "lllr", "srh1", "bigsfc", "effh", "sbcp", "fzlv", "pchg",
)
NUM_CLASSES = len(COND_NAMES)
COND_MAP_FILENAME = "cond_name_to_id.json"

# Human-readable names used in prompts and by the synthetic generator.
COND_DESCRIPTIONS: dict[str, str] = {
    "shr6": "0-6 km bulk wind shear",
    "scp": "supercell composite parameter",
    "tadv": "850 mb temperature advection",
    "lclh": "lifted condensation level height",
    "epvl": "equivalent potential vorticity",
    "laps": "mid-level lapse rates",
    "mcsm": "MCS maintenance probability",
    "rgnlrad": "regional radar composite",
    "mcon": "surface moisture convergence",
    "ttd": "surface temperature and dewpoint",
    "thea": "surface theta-e advection",
    "swbt": "surface wet-bulb temperature",
    "stor": "significant tornado parameter",
    "lllr": "low-level lapse rates",
    "srh1": "0-1 km storm-relative helicity",
    "bigsfc": "surface observations",
    "effh": "effective storm-relative helicity",
    "sbcp": "surface-based CAPE",
    "fzlv": "freezing level height",
    "pchg": "surface pressure change",
}


class UnknownCondName(ValueError):
    pass


def default_cond_name_to_id() -> dict[str, int]:
    return {name: i for i, name in enumerate(COND_NAMES)}


def cond_id(mapping: dict[str, int], name: str, where: str = "") -> int:
    """The id of `name`, or a clear error naming where the unknown name came from."""
    try:
        return mapping[name]
    except KeyError:
        raise UnknownCondName(
            f"{where + ': ' if where else ''}unknown cond_name {name!r}; known: {sorted(mapping)}"
        ) from None


def validate_cond_map(mapping: dict, source: str = "cond_name_to_id") -> dict[str, int]:
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{source}: expected a non-empty JSON object of cond_name -> id")
    ids = sorted(mapping.values())
    if ids != list(range(len(ids))) or not all(isinstance(k, str) for k in mapping):
        raise ValueError(f"{source}: ids must be 0..{len(ids) - 1}, each once; got {mapping}")
    return {str(k): int(v) for k, v in mapping.items()}


def save_cond_map(path: str | Path, mapping: dict[str, int]) -> None:
    atomic_write_json(path, dict(sorted(mapping.items(), key=lambda kv: kv[1])))


def load_cond_map(path: str | Path) -> dict[str, int]:
    path = Path(path)
    if path.is_dir():
        path = path / COND_MAP_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing {COND_MAP_FILENAME}")
    return validate_cond_map(json.loads(path.read_text()), str(path))


def check_same_cond_map(a: dict[str, int], b: dict[str, int], what_a: str, what_b: str) -> None:
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(
            f"cond_name_to_id of {what_a} and {what_b} disagree on {diff}: "
            "shards, checkpoints and the classifier must share one mapping"
        )
