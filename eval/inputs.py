"""Evaluation inputs: the cases a model is evaluated on, from shards or from Gemini JSON + images.

Every evaluation program (generate, compare, ablation, cot_stats) turns its input into a list of
`EvalCase`s, one per image element, carrying the texts the prompts and references are built from
and the Stage1 latent the image prefix is computed from. Two sources:

* shards (`--shard-dir --split val`): latents were cached by the shard builder with the Stage1
  model named in `manifest.json`; nothing has to be encoded again.
* Gemini JSON + GIFs (`--json-path --image-root`): latents are computed here with the Stage1
  encoder, exactly as the shard builder does (same decode, same image size, same pooling).

Selection is deterministic (file order, then element order) so that compare/ablation runs and a
resumed run all see the same cases.
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
from data_prep.gemini import load_gemini_json, resolve_image_path
from data_prep.images import decode_image
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
    """Elements of the Gemini JSON files (no latents yet: see `attach_latents`)."""
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


def attach_latents(cases: list[EvalCase], image_root: str | Path, encoder, image_size: int,
                   frame: int = 0, trainable_blocks: int = 0, batch_size: int = 16,
                   device: str = "cpu") -> list[EvalCase]:
    """Compute the Stage1 latent (and, for K = `trainable_blocks` > 0, the block tokens that the
    checkpoint's fine-tuned Stage1 tail consumes) of every case.

    `encoder` is a `models.stage1.Stage1Encoder`; images are decoded with the shard builder's
    `decode_image`, so the latents match the cached ones of a shard build with the same settings.
    """
    image_root = Path(image_root)
    for start in tqdm(range(0, len(cases), batch_size), desc="stage1 latents", unit="batch"):
        chunk = cases[start:start + batch_size]
        pixels = []
        for c in chunk:
            path = resolve_image_path(image_root, c.image_rel_path)
            if not path.exists():
                raise FileNotFoundError(f"{path}: image of case {c.case_id} element {c.element_index} "
                                        "not found; check --image-root")
            pixels.append(torch.as_tensor(np.asarray(decode_image(path, image_size, frame=frame))))
        with torch.no_grad():
            latent, tokens = encoder.encode(torch.stack(pixels).float().to(device), trainable_blocks=trainable_blocks)
        for i, c in enumerate(chunk):
            c.latent = latent[i].float().cpu().numpy()
            c.block_tokens = None if tokens is None else tokens[i].float().cpu().numpy()
    return cases
