"""A thin wrapper over FAISS: build from vectors with a factory string, search → plain (scores, ids), save, load."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
TRAIN_POINTS_PER_CELL = 64  # k-means sample: FAISS wants at least 39 points a centroid
MMAP_MIN_BYTES = 256 * 1024 ** 2  # IVF index files larger than this are opened memory-mapped


class VectorIndex:
    """Vectors with ids 0..n-1 in insertion order. Scores are inner products for metric 'ip' (cosine on normalised
    vectors) and squared distances for 'l2'. `params` are FAISS search parameters (e.g. nprobe)."""

    def __init__(self, index: faiss.Index, factory: str, metric: str, params: dict | None = None):
        self.index = index
        self.factory = factory
        self.metric = metric
        self.params: dict = {}
        self.set_params(params or {})

    @classmethod
    def build(cls, vectors: np.ndarray, factory: str = "Flat", metric: str = "ip", seed: int = 0) -> "VectorIndex":
        """Train (on a random sample when the index needs training) and add all vectors."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.index_factory(vectors.shape[1], factory, METRICS[metric])
        if not index.is_trained:
            ivf = faiss.try_extract_index_ivf(index)
            wanted = TRAIN_POINTS_PER_CELL * (ivf.nlist if ivf is not None else 256)
            sample = vectors
            if len(vectors) > wanted:
                sample = vectors[np.random.default_rng(seed).choice(len(vectors), wanted, replace=False)]
            index.train(sample)
        if len(vectors):
            index.add(vectors)
        return cls(index, factory, metric)

    def set_params(self, params: dict) -> None:
        """Apply search parameters such as {"nprobe": 16} or {"efSearch": 64}."""
        if params:
            faiss.ParameterSpace().set_index_parameters(self.index, ",".join(f"{k}={v}" for k, v in params.items()))
        self.params = dict(params)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each query row: (scores [n, k'], ids [n, k']) with k' = min(k, ntotal), best first; ids of -1
        mark slots an approximate index could not fill."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(int(k), self.ntotal)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.index.search(queries, k)
        return scores, ids

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, factory: str, metric: str, params: dict | None = None,
             mmap: bool | None = None) -> "VectorIndex":
        """Read an index; mmap=None memory-maps large IVF files (their lists are then paged in on demand)."""
        if mmap is None:
            mmap = factory.startswith("IVF") and Path(path).stat().st_size >= MMAP_MIN_BYTES
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return cls(faiss.read_index(str(path), flags), factory, metric, params)
