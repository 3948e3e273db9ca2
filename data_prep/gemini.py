"""The Gemini-augmented WeatherQA JSON: schema, validation, stable case ids, splits, image paths.

Input files look like the seed's `gemini_element_captions_<years>.json`:

    [ {"global_summary": "Areas affected...", "elements": [
          {"image_rel_path": ".../md_image/2014/shr6/md0123_20140512_18_shr6.gif",
           "cond_name": "shr6", "caption": "S1. S2. S3. S4."}, ...]}, ... ]

Accepted top levels (decided here, nowhere else):
- a list of cases;
- a dict holding that list under "cases" or "data";
- a dict of `case id -> case` (every value an object); the key is the case's explicit id.
Extra fields anywhere are ignored.

Validation never guesses: a bad element (missing/empty path or caption, unknown `cond_name`) is
skipped and recorded in a `SkipReport` with file, case index, element index, field and reason,
and the rest of its case is kept; a case with a bad summary or no valid element is skipped as a
whole. `strict=True` turns the first problem into a `GeminiValidationError`. A file that is not
JSON at all is always fatal: the user pointed at it.

`Element.index` is the element's position in the JSON list (not renumbered after skips), so a
sample can always be traced back to the file.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

from common.io import atomic_write_json, stable_hash
from models.cond_names import UnknownCondName, cond_id

log = logging.getLogger(__name__)

# Explicit id fields, in priority order.
ID_FIELDS: tuple[str, ...] = ("case_id", "id", "md_id", "md_number")
LIST_KEYS: tuple[str, ...] = ("cases", "data")
SPLITS: tuple[str, ...] = ("train", "val")
# md<serial>_<yyyymmdd>[_<hh>]_<param>.gif  ->  md<serial>_<yyyymmdd>[_<hh>]
# The date carries the year, so MD serials (which restart every year) stay unique.
_MD_STEM = re.compile(r"^(md\d+_\d{8}(?:_\d{1,4})?)_", re.IGNORECASE)
_MD_DATE = re.compile(r"^md\d+_(\d{4})\d{4}", re.IGNORECASE)
IMAGE_ROOT_MARKER = "md_image"


@dataclass
class Element:
    index: int  # position in the case's JSON "elements" list
    image_rel_path: str
    cond_name: str
    cond_id: int
    caption: str


@dataclass
class Case:
    case_id: str
    source_file: str
    case_index: int  # position in the source file's list of cases
    global_summary: str
    elements: list[Element]
    split: str = ""  # set by the caller with assign_split()


@dataclass
class Skip:
    """One thing left out of the dataset, and why. `element_index` None: the whole case."""

    file: str
    case_index: Optional[int]
    element_index: Optional[int]
    field: str
    reason: str  # short category: missing, empty, wrong_type, unknown_cond_name, ... (images: see images.py)
    path: str = ""  # the image path, for image problems
    detail: str = ""  # human-readable specifics

    def where(self) -> str:
        parts = [self.file]
        if self.case_index is not None:
            parts.append(f"case {self.case_index}")
        if self.element_index is not None:
            parts.append(f"element {self.element_index}")
        return ", ".join(parts)

    def message(self) -> str:
        msg = f"{self.where()}: field {self.field!r}: {self.reason}"
        if self.path:
            msg += f" ({self.path})"
        return msg + (f": {self.detail}" if self.detail else "")


@dataclass
class SkipReport:
    """Everything that was skipped (JSON validation and image decoding), plus non-fatal notes.

    `len(report)` counts skips only; notes (e.g. a renamed duplicate case id) change no data.
    `cases_read` / `elements_read` count what the JSON held, valid or not (a case whose "elements"
    is not a non-empty list counts as one element): the denominators of "how much was skipped".
    """

    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cases_read: int = 0
    elements_read: int = 0

    def add(self, skip: Skip) -> None:
        self.skips.append(skip)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def merge(self, other: "SkipReport") -> "SkipReport":
        self.skips.extend(other.skips)
        self.notes.extend(other.notes)
        self.cases_read += other.cases_read
        self.elements_read += other.elements_read
        return self

    def __len__(self) -> int:
        return len(self.skips)

    def __iter__(self):
        return iter(self.skips)

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skips).items()))

    def by_field(self) -> dict[str, int]:
        return dict(sorted(Counter(s.field for s in self.skips).items()))

    def num_cases_skipped(self) -> int:
        return sum(s.element_index is None for s in self.skips)

    def num_elements_skipped(self) -> int:
        return sum(s.element_index is not None for s in self.skips)

    def top_reasons(self, n: int = 3) -> list[tuple[str, str, bool, int, Skip]]:
        """The `n` most frequent (field, reason, whole case?) groups, most frequent first (ties in
        report order): (field, reason, is_case, count, first skip of the group, as an example)."""
        groups: dict[tuple[str, str, bool], list] = {}
        for s in self.skips:
            group = groups.setdefault((s.field, s.reason, s.element_index is None), [0, s])
            group[0] += 1
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])  # stable: ties keep report order
        return [(f, r, is_case, count, example) for (f, r, is_case), (count, example) in ranked[:n]]

    def explain(self, image_root: Any, frame_hint: str) -> list[str]:
        """Message lines for a rejected input: the top reasons, an example, and a hint when the top
        reason points at a wrong image root or GIF frame (`frame_hint` names the frame setting)."""
        top = self.top_reasons(3)
        if not top:
            return []
        lines = ["  top skip reasons: " + "; ".join(
            f"{f} {r}: {n} {'case(s)' if is_case else 'element(s)'}" for f, r, is_case, n, _ in top)]
        field_, reason, _, _, example = top[0]
        lines.append(f"  e.g. {example.message()}")
        if field_ == "image_rel_path" and reason == "missing":
            lines.append(f"  hint: images are looked up under --image-root {image_root}: is it the folder that "
                         "holds md_image/?")
        elif field_ == "image_rel_path" and reason == "bad_frame":
            lines.append(f"  hint: {frame_hint} is beyond these images' frames")
        return lines

    def summary(self) -> dict[str, Any]:
        """Counts only (for the manifest); `to_dict()` has every entry."""
        return {"num_skipped": len(self), "cases_skipped": self.num_cases_skipped(),
                "elements_skipped": self.num_elements_skipped(), "by_reason": self.by_reason(),
                "by_field": self.by_field(), "num_notes": len(self.notes),
                "cases_read": self.cases_read, "elements_read": self.elements_read}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "skipped": [asdict(s) for s in self.skips], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> "SkipReport":
        return cls([Skip(**s) for s in d.get("skipped", [])], list(d.get("notes", [])),
                   int(d.get("cases_read", 0)), int(d.get("elements_read", 0)))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SkipReport":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class GeminiValidationError(ValueError):
    """Strict-mode validation failure; the message names file, case index and field."""

    def __init__(self, skip: Skip):
        super().__init__(skip.message())
        self.skip = skip


# ----------------------------------------------------------------------------------------------
# Case ids and splits


def _image_stem(case: dict) -> str:
    """The file stem of the case's first element image, or ''."""
    elements = case.get("elements")
    if isinstance(elements, list):
        for el in elements:
            if isinstance(el, dict) and isinstance(el.get("image_rel_path"), str) and el["image_rel_path"].strip():
                return PurePosixPath(el["image_rel_path"].strip().replace("\\", "/")).stem
    return ""


def case_id_of(case_dict: dict, source_file: str | Path, case_index: int) -> str:
    """A stable id for a case, the same however files are ordered or re-exported.

    1. an explicit id field ("case_id", "id", "md_id", "md_number"); a bare MD number restarts
       every year, so it gets the year of the first image's date when that is known;
    2. else the first image's name: `md0123_20140512_18_shr6.gif` -> `md0123_20140512_18`;
    3. else a hash of the global summary;
    4. else (nothing usable; such a case fails validation anyway) `<file stem>_<case index>`.
    """
    for key in ID_FIELDS:
        value = case_dict.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            text = str(value).strip()
            if key == "md_number" and text.isdigit():
                year = _MD_DATE.match(_image_stem(case_dict))
                text = f"md{int(text):04d}" + (f"_{year.group(1)}" if year else "")
            return text
    m = _MD_STEM.match(_image_stem(case_dict))
    if m:
        return m.group(1).lower()
    summary = case_dict.get("global_summary")
    if isinstance(summary, str) and summary.strip():
        return f"case_{stable_hash(' '.join(summary.split())):016x}"
    return f"{Path(source_file).stem}_{case_index:06d}"


def assign_split(case_id: str, val_fraction: float = 0.1, seed: int = 0) -> str:
    """'train' or 'val' from a stable hash of the case id: reproducible, and whole cases only."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    u = stable_hash(f"split:{seed}:{case_id}") / 2.0**64
    return "val" if u < val_fraction else "train"


# ----------------------------------------------------------------------------------------------
# Image paths


def resolve_image_path(image_root: str | Path, image_rel_path: str) -> Path:
    """Where an element's image lives on this machine.

    Gemini JSON paths were written on another machine, e.g.
    `kse/ClimateToText/data/WeatherQA/md_image/2014/shr6/md..gif`. Rules, in order:
    - a path containing `md_image/` is cut to start there and joined to `image_root` (so
      `image_root` is the folder that holds `md_image/`; passing `.../md_image` itself also works);
    - any other relative path is relative to `image_root`;
    - any other absolute path is used as is.
    """
    root = Path(image_root)
    rel = image_rel_path.strip().replace("\\", "/")
    parts = PurePosixPath(rel).parts
    if IMAGE_ROOT_MARKER in parts:
        rel = "/".join(parts[parts.index(IMAGE_ROOT_MARKER):])
        if root.name == IMAGE_ROOT_MARKER:
            root = root.parent
        return root / rel
    return root / rel  # an absolute `rel` wins over root (pathlib semantics)


# ----------------------------------------------------------------------------------------------
# Loading and validation


class _Problems:
    """Collects skips for one load; raises on the first one in strict mode."""

    def __init__(self, report: SkipReport, strict: bool):
        self.report, self.strict = report, strict

    def __call__(self, file: str, case_index: Optional[int], element_index: Optional[int],
                 field_: str, reason: str, detail: str = "") -> None:
        skip = Skip(file, case_index, element_index, field_, reason, detail=detail)
        if self.strict:
            raise GeminiValidationError(skip)
        self.report.add(skip)


def _read_cases(path: Path) -> list[tuple[Optional[str], Any]]:
    """(id from a dict-of-cases key or None, raw case) for every case of a file, in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: Gemini JSON file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(data, list):
        return [(None, c) for c in data]
    if isinstance(data, dict):
        for key in LIST_KEYS:
            if isinstance(data.get(key), list):
                return [(None, c) for c in data[key]]
        if data and all(isinstance(v, dict) for v in data.values()):
            return [(str(k), v) for k, v in data.items()]
    raise ValueError(f"{path}: expected a list of cases, a dict with a list under one of "
                     f"{list(LIST_KEYS)}, or a dict of case id -> case; got {type(data).__name__}")


def _nonempty_str(d: dict, key: str) -> tuple[Optional[str], str]:
    """(stripped value, '') if `d[key]` is a non-empty string, else (None, reason)."""
    if key not in d or d[key] is None:
        return None, "missing"
    if not isinstance(d[key], str):
        return None, "wrong_type"
    value = d[key].strip()
    return (value, "") if value else (None, "empty")


def _validate_element(raw: Any, index: int, file: str, case_index: int,
                      cond_map: dict[str, int], problem: _Problems) -> Optional[Element]:
    if not isinstance(raw, dict):
        problem(file, case_index, index, "element", "not_an_object", f"got {type(raw).__name__}")
        return None
    values = {}
    for key in ("image_rel_path", "cond_name", "caption"):
        values[key], reason = _nonempty_str(raw, key)
        if reason:
            problem(file, case_index, index, key, reason)
            return None
    try:
        cid = cond_id(cond_map, values["cond_name"])
    except UnknownCondName as e:
        problem(file, case_index, index, "cond_name", "unknown_cond_name", str(e))
        return None
    return Element(index, values["image_rel_path"], values["cond_name"], cid, values["caption"])


def _num_elements(raw: Any) -> int:
    """How many elements a raw case holds, for the report's `elements_read` (at least 1)."""
    elements = raw.get("elements") if isinstance(raw, dict) else None
    return len(elements) if isinstance(elements, list) and elements else 1


def _validate_case(raw: Any, key_id: Optional[str], file: str, case_index: int,
                   cond_map: dict[str, int], problem: _Problems) -> Optional[Case]:
    if not isinstance(raw, dict):
        problem(file, case_index, None, "case", "not_an_object", f"got {type(raw).__name__}")
        return None
    summary, reason = _nonempty_str(raw, "global_summary")
    if reason:
        problem(file, case_index, None, "global_summary", reason)
        return None
    raw_elements = raw.get("elements")
    if not isinstance(raw_elements, list) or not raw_elements:
        reason = "missing" if raw_elements is None else ("empty" if raw_elements == [] else "wrong_type")
        problem(file, case_index, None, "elements", reason)
        return None
    elements = [e for i, r in enumerate(raw_elements)
                if (e := _validate_element(r, i, file, case_index, cond_map, problem)) is not None]
    if not elements:
        problem(file, case_index, None, "elements", "no_valid_elements",
                f"all {len(raw_elements)} elements were skipped")
        return None
    has_explicit_id = any(k in raw for k in ID_FIELDS)
    case_id = case_id_of(raw, file, case_index) if (has_explicit_id or key_id is None) else key_id
    return Case(case_id, file, case_index, summary, elements)


def _make_ids_unique(cases: list[Case], report: SkipReport) -> None:
    """Later duplicates get `__dup<n>` in load order (deterministic), and a note in the report."""
    seen: Counter = Counter()
    taken = {c.case_id for c in cases}
    for case in cases:
        seen[case.case_id] += 1
        if seen[case.case_id] == 1:
            continue
        n, new = seen[case.case_id] - 1, ""
        while not new or new in taken:
            new = f"{case.case_id}__dup{n}"
            n += 1
        taken.add(new)
        msg = (f"{case.source_file}, case {case.case_index}: duplicate case id {case.case_id!r} "
               f"renamed to {new!r}")
        log.warning(msg)
        report.note(msg)
        case.case_id = new


def load_gemini_json(paths: Sequence[str | Path] | str | Path, cond_name_to_id: dict[str, int],
                     strict: bool = False) -> tuple[list[Case], SkipReport]:
    """Load and validate one or several Gemini JSON files, in the order given.

    Returns the valid cases (splits unset) and a report of what was skipped and why.
    `source_file` of each case is the path as given by the caller.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("no Gemini JSON file given")
    resolved = [Path(p).resolve() for p in paths]
    dupes = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if dupes:
        raise ValueError(f"Gemini JSON file(s) given more than once: {dupes}")

    report = SkipReport()
    problem = _Problems(report, strict)
    cases: list[Case] = []
    num_raw = 0
    for path in paths:
        file = str(path)
        raw_cases = _read_cases(Path(path))
        num_raw += len(raw_cases)
        for case_index, (key_id, raw) in enumerate(raw_cases):
            report.cases_read += 1
            report.elements_read += _num_elements(raw)
            case = _validate_case(raw, key_id, file, case_index, cond_name_to_id, problem)
            if case is not None:
                cases.append(case)
    _make_ids_unique(cases, report)
    log.info("loaded %d of %d cases (%d elements) from %d file(s); skipped %d case(s) and %d element(s)",
             len(cases), num_raw, sum(len(c.elements) for c in cases), len(paths),
             report.num_cases_skipped(), report.num_elements_skipped())
    return cases, report
