"""A thin wrapper over FAISS: build from vectors with a factory string, search → plain (scores, ids), save, load.

Search restricted to allowed ids (filters): a few allowed ids (at most EXACT_MAX_FLOATS numbers of their raw vectors)
are scored exactly with numpy from the index's raw vectors, which is cheaper than any index and exact. A filter that
lets most ids through (BROAD_FILTER) runs the plain search for a few times k and drops the others. The rest are
searched by FAISS with an ID selector (a bitmap): exact for Flat; an IVF probes its tuned nprobe lists first and, when
some query finds fewer than k allowed ids there, WIDEN times more until every query has k or every list is probed
(then every allowed id was a candidate, so k are found whenever k are allowed); other index types fall back to exact
scoring when the selector leaves a query short. So a filtered search returns min(k, allowed) results.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
TRAIN_POINTS_PER_CELL = 64  # k-means sample: FAISS wants at least 39 points a centroid
MMAP_MIN_BYTES = 256 * 1024 ** 2  # IVF index files larger than this are opened memory-mapped
EXACT_MAX_FLOATS = 1 << 20  # allowed ids × dim up to this (4 MB of float32 rows): scored exactly, without the index
EXACT_CHUNK_FLOATS = 1 << 22  # rows gathered at a time by exact scoring (bounded memory for a large allowed set)
WIDEN = 4  # an IVF whose probed lists hold fewer than k allowed ids probes this many times more lists
BROAD_FILTER = 0.5  # a filter letting at least this share of the ids through: plain search, then drop the others
OVERSAMPLE = 2  # … fetching k × ntotal / allowed × OVERSAMPLE (the selector path when that holds fewer than k)


class VectorIndex:
    """Vectors with ids 0..n-1 in insertion order. Scores are inner products for metric 'ip' (cosine on normalised
    vectors) and squared distances for 'l2'. `params` are FAISS search parameters (e.g. nprobe). `vectors`: the raw
    vectors (row = id) when known (an opened index has them), for exact scoring of a few allowed ids."""

    vectors: np.ndarray | None = None

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

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each query row: (scores [n, k'], ids [n, k']) with k' = min(k, ntotal), best first; ids of -1
        mark slots an approximate index could not fill. `allowed` (ids; out-of-range ones ignored): only those, and
        k' = min(k, number allowed), every slot filled (see the module docstring)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if allowed is not None:
            allowed = allowed_ids(allowed, self.ntotal)
        k = min(int(k), self.ntotal if allowed is None else len(allowed))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if allowed is None:
            return self.index.search(queries, k)
        if self.vectors is not None and len(allowed) * self.dim <= EXACT_MAX_FLOATS:
            return exact_search(self.vectors, allowed, queries, k, self.metric)
        if len(allowed) >= BROAD_FILTER * self.ntotal:  # FAISS's selector paths skip its BLAS kernels: slower
            found = post_filtered(self.index, queries, k, allowed, self.ntotal)
            if found is not None:
                return found
        selector = IdSelector(allowed, self.ntotal)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            return search_ivf(self.index, ivf, queries, k, selector)
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None)
        try:
            params = (faiss.SearchParametersHNSW(sel=selector.selector, efSearch=max(k, hnsw.efSearch)) if hnsw
                      else faiss.SearchParameters(sel=selector.selector))
            scores, ids = self.index.search(queries, k, params=params)
        except RuntimeError:  # an index type FAISS cannot restrict (IndexPQ): score the allowed ids exactly
            scores, ids = None, None
        if (ids is None or (ids < 0).any()) and self.vectors is not None:
            return exact_search(self.vectors, allowed, queries, k, self.metric)
        if ids is None:
            raise ValueError(f"{self.factory} cannot search among allowed ids without its raw vectors")
        return scores, ids

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, factory: str, metric: str, params: dict | None = None,
             mmap: bool | None = None, vectors: np.ndarray | None = None) -> "VectorIndex":
        """Read an index; mmap=None memory-maps large IVF files (their lists are then paged in on demand). `vectors`:
        its raw vectors (for filtered searches)."""
        if mmap is None:
            mmap = factory.startswith("IVF") and Path(path).stat().st_size >= MMAP_MIN_BYTES
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = cls(faiss.read_index(str(path), flags), factory, metric, params)
        index.vectors = vectors
        return index


def allowed_ids(allowed, ntotal: int) -> np.ndarray:
    """Distinct ids in [0, ntotal), ascending (int64)."""
    allowed = np.asarray(allowed, np.int64).ravel()
    if len(allowed) > 1 and not (allowed[1:] > allowed[:-1]).all():  # Catalog.filter_ids gives them sorted already
        allowed = np.unique(allowed)
    return allowed[(allowed >= 0) & (allowed < ntotal)]


def post_filtered(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray,
                  ntotal: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For a filter that lets most ids through: the plain top k × ntotal / allowed × OVERSAMPLE, the allowed ones
    kept; None when some query keeps fewer than k (then another way is needed). Equal to a restricted search of the
    same index: an allowed id ranked above the k-th kept one would be among those fetched."""
    wanted = min(ntotal, int(np.ceil(k * ntotal / len(allowed) * OVERSAMPLE)))
    scores, ids = index.search(queries, wanted)
    member = np.zeros(ntotal + 1, bool)  # ids of -1 (unfilled slots) look at the last entry: never a member
    member[allowed] = True
    keep = member[ids]
    if (keep.sum(axis=1) < k).any():
        return None
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ones first, in rank order
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class IdSelector:
    """A FAISS selector (bitmap over 0..ntotal-1) of allowed ids; keeps the bitmap alive as long as itself."""

    def __init__(self, allowed: np.ndarray, ntotal: int):
        mask = np.zeros(ntotal, bool)
        mask[allowed] = True
        self.bits = np.packbits(mask, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(self.bits))


def search_ivf(index: faiss.Index, ivf, queries: np.ndarray, k: int, selector: IdSelector,
               enough: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`index.search(queries, k)` among the selected ids, probing the tuned nprobe lists, then WIDEN times more until
    every query has `enough` (default k) results or all lists are probed."""
    nprobe, enough = max(1, ivf.nprobe), k if enough is None else enough
    while True:
        params = faiss.SearchParametersIVF(sel=selector.selector, nprobe=nprobe)
        scores, ids = index.search(queries, k, params=params)
        if nprobe >= ivf.nlist or (ids[:, :enough] >= 0).all():
            return scores, ids
        nprobe = min(ivf.nlist, nprobe * WIDEN)


def exact_search(vectors: np.ndarray, allowed: np.ndarray, queries: np.ndarray, k: int,
                 metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the rows `allowed` (ascending ids, k <= len(allowed)) of `vectors` by exact float32 scores, best
    first, ties by id; rows are read a chunk at a time."""
    dim = vectors.shape[1]
    chunk = max(1, EXACT_CHUNK_FLOATS // max(1, dim))
    best_keys = np.zeros((len(queries), 0), np.float32)  # lower is better: -score for 'ip', the distance for 'l2'
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(allowed), chunk):
        ids = allowed[start:start + chunk]
        rows = np.asarray(vectors[ids], np.float32)
        if metric == "ip":
            keys = -(queries @ rows.T)
        else:
            keys = (queries ** 2).sum(1)[:, None] - 2 * queries @ rows.T + (rows ** 2).sum(1)[None, :]
        keys = np.concatenate([best_keys, keys.astype(np.float32)], axis=1)
        candidates = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        order = np.lexsort((candidates, keys), axis=1)[:, :k]
        best_keys = np.take_along_axis(keys, order, 1)
        best_ids = np.take_along_axis(candidates, order, 1)
    return (-best_keys if metric == "ip" else best_keys), best_ids
