"""The one definition of what a shard sample holds. Written and read only through this module.

One WebDataset sample per image element. Keys inside the tar (`<key>.<ext>`):

| ext          | content                                                                    |
|--------------|----------------------------------------------------------------------------|
| `json`       | metadata: case_id, element_index, split, cond_name, cond_id, caption,      |
|              | global_summary, image_rel_path, source_file, pred_cond_id                  |
| `latent.npy` | Stage1 encoder latent, float16 [latent_dim]                                |
| `cls.npy`    | Stage1 classifier logits, float16 [num_classes]                            |
| `tokens.npy` | (only when K > 0) token states entering the last K encoder blocks,         |
|              | float16 [num_tokens, latent_dim]                                           |
| `gif`        | (only with --keep-images) the raw GIF bytes                                |

Task D (all captions of a case -> summary) needs every caption of a case; those live in the
shard directory's `cases.jsonl` (one line per case: case_id, split, global_summary, captions in
element order), named by the manifest, not repeated in every sample.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SHARD_FORMAT_VERSION = 1
CASES_FILENAME = "cases.jsonl"
MANIFEST_FILENAME = "manifest.json"


@dataclass
class ElementSample:
    case_id: str
    element_index: int
    split: str  # "train" | "val"
    cond_name: str
    cond_id: int
    caption: str
    global_summary: str
    latent: np.ndarray  # float16 [latent_dim]
    cls_logits: np.ndarray  # float16 [num_classes]
    image_rel_path: str = ""
    source_file: str = ""
    pred_cond_id: int = -1
    block_tokens: Optional[np.ndarray] = None  # float16 [num_tokens, latent_dim], K > 0 only
    image_bytes: Optional[bytes] = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return sample_key(self.case_id, self.element_index)


def sample_key(case_id: str, element_index: int) -> str:
    # WebDataset splits the key from the extension at the first '.', so keys must have none.
    safe = "".join(c if (c.isalnum() or c in "-_") else "_" for c in case_id)
    return f"{safe}__e{element_index:02d}"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


_META_FIELDS = ("case_id", "element_index", "split", "cond_name", "cond_id", "caption",
                "global_summary", "image_rel_path", "source_file", "pred_cond_id")


def encode_sample(s: ElementSample) -> dict:
    """ElementSample -> the dict that `webdataset.TarWriter.write` takes."""
    meta = {k: getattr(s, k) for k in _META_FIELDS}
    meta.update(s.extra)
    out = {
        "__key__": s.key,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "latent.npy": _npy_bytes(s.latent.astype(np.float16)),
        "cls.npy": _npy_bytes(s.cls_logits.astype(np.float16)),
    }
    if s.block_tokens is not None:
        out["tokens.npy"] = _npy_bytes(s.block_tokens.astype(np.float16))
    if s.image_bytes is not None:
        out["gif"] = s.image_bytes
    return out


class SampleFormatError(ValueError):
    pass


def decode_sample(raw: dict) -> ElementSample:
    """A raw WebDataset sample (ext -> bytes, plus __key__/__url__) -> ElementSample.

    Raises SampleFormatError naming the shard (`__url__`) and key when a field is missing/bad.
    """
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    try:
        meta = json.loads(raw["json"])
        extra = {k: v for k, v in meta.items() if k not in _META_FIELDS}
        return ElementSample(
            **{k: meta[k] for k in _META_FIELDS if k in meta},
            latent=_npy_load(raw["latent.npy"]),
            cls_logits=_npy_load(raw["cls.npy"]),
            block_tokens=_npy_load(raw["tokens.npy"]) if "tokens.npy" in raw else None,
            image_bytes=raw.get("gif"),
            extra=extra,
        )
    except KeyError as e:
        raise SampleFormatError(f"{where}: sample lacks field {e}") from None
    except (ValueError, TypeError) as e:
        raise SampleFormatError(f"{where}: malformed sample: {e}") from None
