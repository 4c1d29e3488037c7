"""A thin wrapper over FAISS: build from vectors with a factory string, search → plain (scores, ids), save, load."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


class VectorIndex:
    """Vectors with ids 0..n-1 in insertion order. Scores are inner products for metric 'ip' (cosine on normalised
    vectors) and squared distances for 'l2'."""

    def __init__(self, index: faiss.Index, factory: str, metric: str):
        self.index = index
        self.factory = factory
        self.metric = metric

    @classmethod
    def build(cls, vectors: np.ndarray, factory: str = "Flat", metric: str = "ip") -> "VectorIndex":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.index_factory(vectors.shape[1], factory, METRICS[metric])
        if not index.is_trained:
            index.train(vectors)
        if len(vectors):
            index.add(vectors)
        return cls(index, factory, metric)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each query row: (scores [n, k'], ids [n, k']) with k' = min(k, ntotal), best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(int(k), self.ntotal)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.index.search(queries, k)
        return scores, ids

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, factory: str, metric: str, mmap: bool = False) -> "VectorIndex":
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return cls(faiss.read_index(str(path), flags), factory, metric)
