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
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .errors import EngineError
from .layout import FAISS_FILES, IVFDATA_FILES, KINDS
from .vector_index import VectorIndex

if TYPE_CHECKING:
    from .manifest import Manifest

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
    recall_at_10: float | None = None  # against exact search, on held-out queries (1.0 for Flat: it is exact)
    memory_bytes: int = 0
    trained_on: int | None = None  # vectors present when the quantiser was trained (IVF); None: nothing trained
    recall_queries: int = 0  # how many held-out queries recall_at_10 was measured on (0: exact, not measured)


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


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, metric: str, k: int = 10) -> np.ndarray:
    """Ids of the exact top-k of `vectors` for each query (FAISS Flat: the reference recall is measured against)."""
    return VectorIndex.build(vectors, "Flat", metric).search(queries, k)[1]


def measure_recall(index: VectorIndex, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """recall@k of `index` at its current parameters against exact search over `vectors` (its rows, ids in order)."""
    return recall_at_k(index.search(queries, k)[1], exact_top_k(vectors, queries, index.metric, k))


def tune(index: VectorIndex, vectors: np.ndarray, queries: np.ndarray, target: float, k: int = 10) -> IndexReport:
    """Smallest nprobe (IVF) reaching `target` recall@k against exact search; the highest tried if none does."""
    exact = exact_top_k(vectors, queries, index.metric, k)
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
    held_out = held_out_queries(vectors, queries, rng)
    report = tune(index, vectors, held_out, target_recall)
    return index, IndexReport(factory, report.params, report.recall_at_10, memory, n, len(held_out))


def ann_stats(manifest: Manifest, directory: Path) -> dict:
    """Per kind, what the index in use is and how well it finds the exact top 10 (manifest.indexes, written by
    indexer/ann_recall.py): factory, params, vectors, bytes on disk, recall@10 (1.0 and exact for Flat) with when
    and on how many held-out queries it was measured, the vectors trained on and the share added since, the target.
    Indexes built before these were recorded give None for what they lack."""
    stats = {}
    for kind in KINDS:
        entry = manifest.index_report(kind)
        n = manifest.n_images if kind == "images" else manifest.n_captions
        files = [directory / FAISS_FILES[kind]] + ([directory / IVFDATA_FILES[kind]] if entry.get("on_disk") else [])
        exact = bool(entry.get("exact", entry["factory"] == "Flat"))
        added = entry.get("added_since_training")
        stats[kind] = {
            "factory": entry["factory"], "params": entry.get("params", {}), "vectors": n,
            "bytes_on_disk": sum(f.stat().st_size for f in files if f.is_file()), "exact": exact,
            "recall_at_10": 1.0 if exact else entry.get("recall_at_10"),
            "measured": None if exact else {"by": entry.get("recall_measured"), "at": manifest.created,
                                            "queries": entry.get("recall_queries")},
            "trained_on": entry.get("trained_on"), "added_since_training": added,
            "share_added_since_training": round(added / n, 4) if added is not None and n else None,
            "target_recall": entry.get("target_recall"), "on_disk": bool(entry.get("on_disk")),
            "recall_history": entry.get("recall_history", [])}
    return stats
