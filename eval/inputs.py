"""Evaluation inputs: the cases a model is evaluated on, from shards or from Gemini JSON + images.

Every evaluation program (generate, compare, ablation, cot_stats) turns its input into a list of
`EvalCase`s, one per image element, carrying the texts the prompts and references are built from
and the Stage1 latent the image prefix is computed from. Two sources:

* shards (`--shard-dir --split val`): latents were cached by the shard builder with the Stage1
  model named in `manifest.json`; nothing has to be encoded again.
* Gemini JSON + GIFs (`--json-path --image-root`): elements are read and checked exactly as the
  shard builder does (`load_gemini_json`; every image decoded with `decode_image_uint8`, normalised
  with `normalize_pixels`), and latents computed here with the Stage1 encoder (same image size,
  frame and pooling). A bad element (JSON field or image) is skipped and recorded as the builder
  records it, in a `SkipReport` (`json_skip_summary` prints it, writes it, and fails when nothing
  is usable).

Selection is deterministic (file order, then element order) so that compare/ablation runs and a
resumed run all see the same cases; with JSON input it counts usable elements only, and every model
(the text-only baseline too) gets the same ones.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.io import read_jsonl
from data_prep.build_shards import InputError, image_skip, normalize_pixels
from data_prep.gemini import Case, Element, SkipReport, load_gemini_json, resolve_image_path
from data_prep.images import ImageDecodeError, decode_image_uint8
from data_prep.shard_format import CASES_FILENAME, MANIFEST_FILENAME, decode_sample
from models.cond_names import check_same_cond_map


@dataclass
class EvalCase:
    """One image element of one case, with everything any task's prompt/reference needs."""

    case_id: str
    element_index: int
    cond_name: str
    cond_id: int
    caption: str
    global_summary: str
    case_captions: list[str] = field(default_factory=list)
    latent: Optional[np.ndarray] = None  # float32 [latent_dim]
    block_tokens: Optional[np.ndarray] = None  # float32 [T, latent_dim] when K > 0
    image_rel_path: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.case_id, self.element_index)


def select_cases(cases: Sequence[EvalCase], num_samples: int, elements_per_case: int) -> list[EvalCase]:
    """The first `elements_per_case` elements of each case (0 = all), at most `num_samples` (0 = all)."""
    out, taken = [], {}
    for c in cases:
        n = taken.get(c.case_id, 0)
        if elements_per_case and n >= elements_per_case:
            continue
        taken[c.case_id] = n + 1
        out.append(c)
        if num_samples and len(out) >= num_samples:
            break
    return out


# --------------------------------------------------------------------------------------- shards
def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; --shard-dir must be a directory built by data_prep.build_shards")
    return json.loads(path.read_text())


def _iter_tar_samples(path: Path):
    """Raw samples of one WebDataset tar (ext -> bytes), grouped by key in file order."""
    current: dict = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = Path(member.name).name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            if not current:
                current = {"__key__": key, "__url__": str(path)}
            current[ext] = tar.extractfile(member).read()
    if current:
        yield current


def load_shard_cases(shard_dir: str | Path, split: str = "val",
                     cond_map: Optional[dict[str, int]] = None, max_cases: int = 0) -> list[EvalCase]:
    """All elements of `split` in the shard directory (file order), checked against `cond_map`.

    `max_cases` > 0 stops reading once that many distinct cases were seen (big val splits).
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if cond_map is not None and "cond_name_to_id" in manifest:
        check_same_cond_map(cond_map, manifest["cond_name_to_id"], "the checkpoint",
                            f"the shards ({shard_dir / MANIFEST_FILENAME})")
    shards = [s["name"] for s in manifest.get("shards", []) if s.get("split") == split]
    if not shards:
        raise ValueError(f"{shard_dir / MANIFEST_FILENAME}: no shards of split {split!r}")
    captions = _read_case_captions(shard_dir / manifest.get("cases_file", CASES_FILENAME))
    out: list[EvalCase] = []
    seen_cases: set[str] = set()
    for name in shards:
        for raw in _iter_tar_samples(shard_dir / name):
            s = decode_sample(raw)
            if max_cases and s.case_id not in seen_cases and len(seen_cases) >= max_cases:
                return out
            seen_cases.add(s.case_id)
            out.append(EvalCase(
                case_id=s.case_id, element_index=s.element_index, cond_name=s.cond_name,
                cond_id=s.cond_id, caption=s.caption, global_summary=s.global_summary,
                case_captions=captions.get(s.case_id, []),
                latent=s.latent.astype(np.float32),
                block_tokens=None if s.block_tokens is None else s.block_tokens.astype(np.float32),
                image_rel_path=s.image_rel_path))
    return out


def _read_case_captions(path: Path) -> dict[str, list[str]]:
    if not path.exists():
        return {}

    return {r["case_id"]: list(r.get("captions", [])) for r in read_jsonl(path)}


# ------------------------------------------------------------------------------- JSON + images
def load_json_cases(json_paths: Sequence[str], cond_map: dict[str, int], max_cases: int = 0) -> list[EvalCase]:
    """Elements of the Gemini JSON files, JSON validation only (no image check, no latents): for
    text statistics (eval.cot_stats). Generation reads JSON input with `load_json_inputs`."""
    cases, report = load_gemini_json(list(json_paths), cond_map, strict=False)
    if len(report):
        print(f"[inputs] skipped while reading {list(json_paths)}: {report.by_reason()}")
    out = []
    for n, case in enumerate(cases):
        if max_cases and n >= max_cases:
            break
        elements = list(case.elements)
        caps = [e.caption for e in elements]
        for e in elements:
            out.append(EvalCase(
                case_id=str(case.case_id), element_index=e.index,
                cond_name=e.cond_name, cond_id=e.cond_id,
                caption=e.caption or "", global_summary=case.global_summary or "",
                case_captions=caps, image_rel_path=e.image_rel_path))
    return out


def load_json_inputs(json_paths: Sequence[str], cond_map: dict[str, int], image_root: str | Path,
                     image_size: int, frame: int = 0, encoder=None, trainable_blocks: int = 0,
                     num_samples: int = 0, elements_per_case: int = 0, max_cases: int = 0,
                     batch_size: int = 16, device: str = "cpu") -> tuple[list[EvalCase], SkipReport]:
    """The selected elements of Gemini JSON files, read as the shard builder reads them, with their
    Stage1 latents (and, for K = `trainable_blocks` > 0, the block tokens the checkpoint's Stage1 tail
    consumes) when `encoder` (a `models.stage1.Stage1Encoder`) is given; plus the skip report.

    Reading and validation are `load_gemini_json`'s; every element of a case that is looked at has
    its image decoded like the builder's workers do (`decode_image_uint8`, normalised on the encoder's
    device with `normalize_pixels`), and one that cannot be decoded is skipped and recorded with the
    builder's `image_skip`, next to the JSON's own skips. A case's captions (task text_summary) are
    those of its usable elements, as in the shards' cases.jsonl. Selection follows `select_cases`
    over usable elements only: the first `elements_per_case` of each case (0 = all), at most
    `num_samples` elements (0 = all) from at most `max_cases` cases (0 = all).
    """
    cases, report = load_gemini_json(list(json_paths), cond_map, strict=False)
    image_root = Path(image_root)
    out: list[EvalCase] = []
    pending: list[tuple[EvalCase, np.ndarray]] = []  # selected, waiting for the encoder
    num_cases = 0
    bar = tqdm(total=num_samples or None, desc="JSON elements" + (" + stage1 latents" if encoder else ""),
               unit="element")
    for case in cases:
        if (num_samples and len(out) >= num_samples) or (max_cases and num_cases >= max_cases):
            break
        usable = _decode_case_images(case, image_root, image_size, frame, report)
        if not usable:
            continue
        num_cases += 1
        captions = [el.caption for el, _ in usable]
        for el, pixels in usable[:elements_per_case or None]:
            if num_samples and len(out) >= num_samples:
                break
            c = EvalCase(case_id=str(case.case_id), element_index=el.index, cond_name=el.cond_name,
                         cond_id=el.cond_id, caption=el.caption or "", global_summary=case.global_summary or "",
                         case_captions=captions, image_rel_path=el.image_rel_path)
            out.append(c)
            bar.update(1)
            if encoder is not None:
                pending.append((c, pixels))
                if len(pending) >= batch_size:
                    _encode(pending, encoder, trainable_blocks, device)
                    pending = []
    if pending:
        _encode(pending, encoder, trainable_blocks, device)
    bar.close()
    return out, report


def _decode_case_images(case: Case, image_root: Path, image_size: int, frame: int,
                        report: SkipReport) -> list[tuple[Element, np.ndarray]]:
    """(element, uint8 pixels) of the case's elements whose image decodes; the others go to `report`."""
    usable = []
    for el in case.elements:
        try:
            pixels = decode_image_uint8(resolve_image_path(image_root, el.image_rel_path), image_size, frame)
        except ImageDecodeError as e:
            report.add(image_skip(case, el, e.path, e.reason, e.detail))
            continue
        usable.append((el, pixels))
    return usable


def _encode(pending: list[tuple[EvalCase, np.ndarray]], encoder, trainable_blocks: int, device: str) -> None:
    pixels = normalize_pixels(torch.from_numpy(np.stack([p for _, p in pending])).to(device))
    with torch.no_grad():
        latent, tokens = encoder.encode(pixels, trainable_blocks=trainable_blocks)
    for i, (c, _) in enumerate(pending):
        c.latent = latent[i].float().cpu().numpy()
        c.block_tokens = None if tokens is None else tokens[i].float().cpu().numpy()


def json_skip_summary(report: SkipReport, num_used: int, json_paths: Sequence[str], image_root: str | Path,
                      report_path: Optional[str | Path] = None) -> None:
    """Print what was skipped (counts by reason, where the details are), save the report to
    `report_path` when given, and fail, as the shard builder does, when no element is usable."""
    if report_path is not None:
        report.save(report_path)
    if num_used == 0:
        raise InputError(_nothing_usable_message(report, json_paths, image_root, report_path))
    where = f"; details in {report_path}" if report_path is not None else ""
    if len(report):
        reasons = ", ".join(f"{r}: {n}" for r, n in report.by_reason().items())
        print(f"[inputs] {num_used} element(s) used; skipped {report.num_cases_skipped()} case(s) and "
              f"{report.num_elements_skipped()} element(s) ({reasons}){where}", flush=True)
    else:
        print(f"[inputs] {num_used} element(s) used; nothing skipped", flush=True)


def _nothing_usable_message(report: SkipReport, json_paths: Sequence[str], image_root: str | Path,
                            report_path: Optional[str | Path]) -> str:
    lines = [f"no usable element in the Gemini JSON ({', '.join(map(str, json_paths))}): "
             + (f"all {report.elements_read} element(s) of {report.cases_read} case(s) skipped"
                if report.elements_read else "it holds no case")]
    lines += report.explain(image_root, "--gif-frame (or the checkpoint's)")
    if report_path is not None:
        lines.append(f"  every skip: {report_path}")
    return "\n".join(lines)
