"""Nearest-neighbour demonstrations (instruction prompt tuning, in-context learning).

Sentences are embedded with a sentence encoder (default all-MiniLM-L6-v2: mean pooling over
tokens, L2-normalised, as sentence-transformers does) and searched with faiss (exact inner
product = cosine similarity)."""
from __future__ import annotations

import numpy as np
import torch

from ..extras import require
from .models import load_model, load_tokenizer


class SentenceEncoder:
    """Mean-pooled, normalised sentence embeddings from a BERT-style encoder."""

    def __init__(self, name_or_path: str = "minilm", max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModel

        self.tokenizer = load_tokenizer(name_or_path)
        self.model = load_model(name_or_path, AutoModel).eval()
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        return np.concatenate(out).astype("float32") if out else np.zeros((0, 1), "float32")


class KNNIndex:
    """Exact cosine-similarity search over normalised vectors with faiss."""

    def __init__(self, vectors: np.ndarray):
        faiss = require("faiss", "recipes", "Nearest-neighbour search (KNNIndex, the ipt recipe)", package="faiss-cpu")
        vectors = np.ascontiguousarray(vectors, dtype="float32")
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def search(self, queries: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
        """Indices of the k nearest stored vectors per query, best first. exclude_self drops
        query i's own index i (queries are the stored vectors themselves)."""
        queries = np.ascontiguousarray(queries, dtype="float32")
        extra = 1 if exclude_self else 0
        _, idx = self.index.search(queries, min(k + extra, self.index.ntotal))
        if not exclude_self:
            return idx[:, :k]
        rows = [[j for j in row if j != i and j >= 0][:k] for i, row in enumerate(idx)]
        return np.array(rows, dtype="int64")


def nearest_demonstrations(encoder, pool: list[str], queries: list[str] | None, k: int) -> np.ndarray:
    """For each query (or, with queries=None, each pool text, itself excluded) the indices
    of its k nearest pool texts."""
    pool_vecs = encoder(pool)
    index = KNNIndex(pool_vecs)
    if queries is None:
        return index.search(pool_vecs, k, exclude_self=True)
    return index.search(encoder(queries), k)
