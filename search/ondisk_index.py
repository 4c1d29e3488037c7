"""An on-disk IVF (usually IVF-PQ) whose candidates are re-scored exactly from the raw vectors: VectorIndex's
interface for indexes larger than memory (built by indexer/ondisk_build.py).

The inverted lists live in `NAME.ivfdata` beside `NAME.faiss` and are memory-mapped by FAISS; the raw vectors are the
index directory's memory-mapped `.npy` file (float32, or float16 when the embedding folder held float16). A search
asks the IVF for k × `refine` candidates and ranks them by their exact score with the query, computed in float32:
what FAISS's IndexRefineFlat does, without holding every vector in memory.

Restricted to allowed ids (filters): few allowed ids are scored exactly from the raw vectors; otherwise the IVF proposes
candidates among the allowed ids only (an ID selector), probing more lists until each query has k of them (as
search/vector_index.py does), and those are re-scored as always.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from .vector_index import EXACT_MAX_FLOATS, IdSelector, VectorIndex, allowed_ids, exact_search, search_ivf

REFINE_PARAM = "refine"  # search parameter: candidates fetched per result (k × refine), re-scored exactly
DEFAULT_REFINE = 10
# queries re-scored through one mapping: a page fault maps its neighbours too (the kernel's fault-around, 64 KB), so
# a mapping's resident pages grow by up to ~64 KB a candidate (measured ~180 KB with readahead, before MADV_RANDOM);
# 4 queries x 400 candidates keep that near 0.1 GB
QUERIES_PER_MAPPING = 4
_EMPTY_SCORE = {"ip": -np.finfo(np.float32).max, "l2": np.finfo(np.float32).max}  # what FAISS puts in unfilled slots


class OnDiskIndex(VectorIndex):
    """Vectors with ids 0..n-1 (row = id of `vectors`). Scores: inner products (metric 'ip') or squared distances
    ('l2'), exact up to float32 rounding; best first, ties by id. `params`: FAISS's (nprobe) plus `refine`."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, factory: str, metric: str,
                 params: dict | None = None):
        if index.ntotal != len(vectors):
            raise ValueError(f"the IVF holds {index.ntotal} vectors, the raw vectors file {len(vectors)}")
        self.vectors = vectors
        self.refine = DEFAULT_REFINE
        super().__init__(index, factory, metric, params)

    @classmethod
    def load(cls, path: Path, vectors: np.ndarray, factory: str, metric: str,
             params: dict | None = None) -> "OnDiskIndex":
        """Open `path` (its .ivfdata file beside it) read-only and memory-mapped; RuntimeError when FAISS cannot."""
        with faiss_quiet():
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        return cls(index, vectors, factory, metric, params)

    def set_params(self, params: dict) -> None:
        """Apply {"nprobe": 32, "refine": 10}; parameters not given keep their value."""
        params = dict(params)
        if REFINE_PARAM in params:
            self.refine = max(1, int(params.pop(REFINE_PARAM)))
        if params:
            faiss.ParameterSpace().set_index_parameters(self.index, ",".join(f"{k}={v}" for k, v in params.items()))
        self.params = {**{k: v for k, v in self.params.items() if k != REFINE_PARAM}, **params,
                       REFINE_PARAM: self.refine}

    def _mapped(self) -> np.ndarray:
        """The raw vectors through a mapping made for one search and dropped after it: the pages it reads stay in the
        page cache (shared, reclaimable) instead of adding up in this process's resident memory, search after search
        (tuning re-scores hundreds of thousands of rows scattered over the whole file)."""
        vectors = self.vectors
        if isinstance(vectors, np.memmap) and vectors.filename and len(vectors):
            mapped = np.memmap(vectors.filename, vectors.dtype, "r", vectors.offset, vectors.shape)
            with contextlib.suppress(AttributeError, OSError):  # no readahead around rows picked at random
                mapped._mmap.madvise(mmap.MADV_RANDOM)
            return mapped
        return vectors

    def candidates(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """The ids the IVF proposes for `k` results: [n, min(ntotal, k × refine)], -1 where it found fewer. With
        `allowed` (distinct ascending ids): among those only, probing more lists until every query has them all
        (k × refine, or every allowed id when fewer)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if allowed is None:
            return self.index.search(queries, min(self.ntotal, int(k) * self.refine))[1]
        wanted = min(len(allowed), int(k) * self.refine)
        ivf = faiss.try_extract_index_ivf(self.index)
        return search_ivf(self.index, ivf, queries, wanted, IdSelector(allowed, self.ntotal))[1]

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each query row: (scores [n, k'], ids [n, k']) with k' = min(k, ntotal), best first; ids of -1
        mark slots the candidates could not fill. `allowed` (ids; out-of-range ones ignored): only those, and
        k' = min(k, number allowed), every slot filled."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if allowed is not None:
            allowed = allowed_ids(allowed, self.ntotal)
        k = min(int(k), self.ntotal if allowed is None else len(allowed))
        scores = np.full((len(queries), max(k, 0)), _EMPTY_SCORE[self.metric], np.float32)
        ids = np.full((len(queries), max(k, 0)), -1, np.int64)
        if k <= 0:
            return scores, ids
        if allowed is not None and len(allowed) * self.dim <= EXACT_MAX_FLOATS:
            return exact_search(self._mapped(), allowed, queries, k, self.metric)
        candidates = self.candidates(queries, k, allowed)
        vectors = None
        for row, (query, found) in enumerate(zip(queries, candidates)):
            if row % QUERIES_PER_MAPPING == 0:
                vectors = self._mapped()  # the previous mapping (and the pages it pulled in) is dropped here
            found = np.unique(found[found >= 0])  # ascending: pages of the mapped file read in order
            if not len(found):
                continue
            exact = rescore(vectors, found, query, self.metric)
            best = np.lexsort((found, -exact if self.metric == "ip" else exact))[:k]  # stable: ties by id
            scores[row, :len(best)], ids[row, :len(best)] = exact[best], found[best]
        return scores, ids


_QUIET = threading.Lock()


@contextlib.contextmanager
def faiss_quiet() -> Iterator[None]:
    """Silence what FAISS's C++ prints on stdout while on-disk lists are opened or merged ("IO_FLAG_ONDISK_SAME_DIR:
    updating ondisk filename ...", "resizing ..."): our stdout carries results (`search query --json`). The process's
    file descriptor 1 points at /dev/null for that instant; C stdio is flushed before it is restored."""
    with _QUIET:
        sys.stdout.flush()
        libc = ctypes.CDLL(None)
        libc.fflush(None)
        saved = os.dup(1)
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def rescore(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """Exact float32 scores of `query` with the rows `ids` (ascending) of `vectors`."""
    rows = np.asarray(vectors[ids], np.float32)
    if metric == "ip":
        return rows @ query
    diff = rows - query
    return np.einsum("ij,ij->i", diff, diff)
