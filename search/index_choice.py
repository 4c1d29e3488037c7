"""Choosing, training and tuning the FAISS index for a collection, the way autofaiss does.

Small collections get exact `Flat` search. Larger ones get IVF (inverted lists over k-means cells; an HNSW coarse
quantiser when the cells are many), storing full vectors when the memory budget allows, else 8-bit scalar or product
quantised codes. The quantiser is trained on a sample; `nprobe` is then raised until recall@10 against exact search,
on held-out queries, reaches the target. The chosen parameters go in the manifest.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import faiss
import numpy as np

from .errors import EngineError
from .vector_index import VectorIndex

log = logging.getLogger(__name__)

FLAT_MAX = 30_000  # exact search over 30k x 512 floats answers in a few ms on 2 cores
DEFAULT_TARGET_RECALL = 0.98
TUNING_QUERIES = 500


@dataclass(frozen=True)
class IndexOptions:
    factory: str | None = None  # a FAISS factory string forces the choice (--index-type)
    memory_budget: int | None = None  # bytes for all vectors of an index directory (--memory-budget)
    target_recall: float = DEFAULT_TARGET_RECALL  # recall@10 against exact search that tuning must reach


@dataclass(frozen=True)
class IndexReport:
    factory: str
    params: dict = field(default_factory=dict)  # e.g. {"nprobe": 16}
    recall_at_10: float | None = None  # against exact search, on held-out queries
    memory_bytes: int = 0


def parse_size(text: str | None) -> int | None:
    """'2GB', '512M', '1.5g', '1000000' → bytes."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not match:
        raise EngineError(f"cannot read the size '{text}' (write e.g. 2GB or 512MB)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def estimate_bytes(factory: str, n: int, d: int) -> int:
    """Rough resident size of an index: codes + ids + centroids."""
    nlist = int(m.group(1)) if (m := re.match(r"IVF(\d+)", factory)) else 0
    if "PQ" in factory:
        code = int(re.search(r"PQ(\d+)", factory).group(1))
    elif "SQ8" in factory:
        code = d
    else:
        code = 4 * d
    ids = 8 if nlist else 0
    return n * (code + ids) + nlist * d * 4


def plan_factory(n: int, d: int, memory_budget: int | None = None) -> str:
    """The FAISS factory string for n vectors of dimension d within a memory budget (bytes; None = unbounded)."""
    if n <= FLAT_MAX and (memory_budget is None or estimate_bytes("Flat", n, d) <= memory_budget):
        return "Flat"
    nlist = max(64, min(65536, 2 ** round(math.log2(4 * math.sqrt(n)))))
    quantiser = f"IVF{nlist}_HNSW32" if nlist >= 16384 else f"IVF{nlist}"
    for codes in ("Flat", "SQ8"):
        factory = f"{quantiser},{codes}"
        if memory_budget is None or estimate_bytes(factory, n, d) <= memory_budget:
            return factory
    for m in (64, 32, 16, 8, 4):  # product quantisation: m bytes a vector
        if d % m == 0 and estimate_bytes(f"{quantiser},PQ{m}", n, d) <= memory_budget:
            return f"{quantiser},PQ{m}"
    raise EngineError(f"{n} vectors of dimension {d} do not fit in a memory budget of {memory_budget} bytes")


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def held_out_queries(vectors: np.ndarray, queries: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    if queries is not None and len(queries):
        return np.ascontiguousarray(queries[rng.choice(len(queries), min(TUNING_QUERIES, len(queries)), replace=False)])
    # no queries of the other modality: perturbed copies of stored vectors (cosine ~0.8 to their source), so a
    # query is near its source without being it
    picked = vectors[rng.choice(len(vectors), min(TUNING_QUERIES, len(vectors)), replace=False)]
    noisy = picked + rng.normal(0, 0.75 / math.sqrt(vectors.shape[1]), picked.shape).astype(np.float32)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def raise_nprobe(index: VectorIndex, queries: np.ndarray, exact: np.ndarray, target: float,
                 ceiling: int) -> tuple[int, float]:
    """Set on `index` the smallest nprobe up to `ceiling` whose recall@k against the `exact` top-k ids reaches
    `target` (doubling while far below it, then in quarter steps); (nprobe, recall reached)."""
    nprobe = 1
    while True:
        index.set_params({"nprobe": nprobe})
        recall = recall_at_k(index.search(queries, exact.shape[1])[1], exact)
        if recall >= target or nprobe >= ceiling:
            return nprobe, recall
        nprobe = min(ceiling, nprobe * 2 if recall < target - 0.05 else nprobe + max(1, nprobe // 4))


def tune(index: VectorIndex, vectors: np.ndarray, queries: np.ndarray, target: float, k: int = 10) -> IndexReport:
    """Smallest nprobe (IVF) reaching `target` recall@k against exact search; the highest tried if none does."""
    exact = VectorIndex.build(vectors, "Flat", index.metric).search(queries, k)[1]
    nlist = faiss.extract_index_ivf(index.index).nlist
    nprobe, recall = raise_nprobe(index, queries, exact, target, nlist)
    if recall < target:
        log.warning("%s reaches recall@%d %.3f < target %.3f even at nprobe=%d", index.factory, k, recall, target,
                    nprobe)
    elif nprobe > nlist // 4:
        log.warning("%s needs nprobe=%d of %d lists for recall@%d %.3f: the vectors have little cluster structure, "
                    "so it is barely faster than exact search (--index-type Flat)", index.factory, nprobe, nlist, k,
                    target)
    return IndexReport(index.factory, {"nprobe": nprobe}, round(recall, 4))


def build_tuned(vectors: np.ndarray, factory: str | None = None, memory_budget: int | None = None,
                target_recall: float = DEFAULT_TARGET_RECALL, queries: np.ndarray | None = None,
                metric: str = "ip", seed: int = 0) -> tuple[VectorIndex, IndexReport]:
    """Build the index for `vectors` (planned unless `factory` is given), trained on a sample and tuned."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    factory = "Flat" if n == 0 else factory or plan_factory(n, d, memory_budget)
    try:
        index = VectorIndex.build(vectors, factory, metric, seed=seed)
    except RuntimeError as exc:
        raise EngineError(f"cannot build FAISS index '{factory}': {str(exc).strip().splitlines()[-1]}") from None
    memory = estimate_bytes(factory, n, d)
    if not factory.startswith("IVF") or n == 0:
        return index, IndexReport(factory, {}, 1.0 if factory == "Flat" else None, memory)
    rng = np.random.default_rng(seed)
    report = tune(index, vectors, held_out_queries(vectors, queries, rng), target_recall)
    return index, IndexReport(factory, report.params, report.recall_at_10, memory)
