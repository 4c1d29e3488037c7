"""One on-disk IVF over a raw vectors file: train the quantiser once on a sample drawn from every part of the file,
fill shards with global ids (clones of that one trained index; in this process or as Ray tasks), merge them with
`faiss.contrib.ondisk.merge_ondisk` into NAME.faiss + NAME.ivfdata, then tune nprobe against exact search computed
by streaming over the raw vectors. Every step reads the vectors in chunks sized from the memory budget.

The FAISS pitfalls this respects: every shard is a clone of the same trained index (same centroids and codebooks);
shards get ids with `add_with_ids` (row numbers of the raw file), so the merge keeps them (shift_ids=False); nothing is
added to or merged into an index once it is on disk. The merged lists hold each shard's entries in shard order, so
the result equals one in-memory IVF filled in id order with the same trained index.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from search.errors import EngineError
from search.index_choice import DEFAULT_TARGET_RECALL, held_out_queries, raise_nprobe
from search.ondisk_index import DEFAULT_REFINE, REFINE_PARAM, OnDiskIndex, faiss_quiet
from search.vector_index import METRICS, TRAIN_POINTS_PER_CELL

from .embedding_stream import NpyFile

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 2 * 1024 ** 3
PQ_TRAIN_POINTS = 256 * 256  # FAISS subsamples PQ training to this many points
MIN_POINTS_PER_CELL = 39  # FAISS's k-means warns below this many training points a centroid
PQ_MIN_VECTORS = 256 * MIN_POINTS_PER_CELL  # fewer: IVF,Flat (too few to train PQ codebooks; full codes are small)
TUNING_QUERIES = 500
REFINE_STEPS = 2  # tuning may double the refine factor this many times (10 → 40)
K = 10


@dataclass(frozen=True)
class Budget:
    """How `--memory-budget` bytes are shared by the steps (each step holds one of these at a time)."""

    total: int = DEFAULT_MEMORY_BUDGET

    def chunk_rows(self, dim: int) -> int:
        """Rows of float32 vectors read at once (a chunk is copied a few times: dtype, normalising, FAISS)."""
        return max(256, self.total // 16 // (4 * dim))

    def sample_rows(self, dim: int) -> int:
        return max(1024, self.total // 4 // (4 * dim))

    def shard_rows(self, code_bytes: int, concurrent: int = 1) -> int:
        """Entries of one shard (codes and ids in memory while it fills); `concurrent` shards fill at once."""
        return max(1024, self.total // 4 // concurrent // (code_bytes + 8))


def plan_ondisk(n: int, d: int) -> str:
    """IVF-PQ with nlist ~ sqrt(n) (a power of 2: k-means on many more lists costs hours on a few cores) and one
    byte per 8 dimensions (64 bytes at 512-d); IVF,Flat for small collections."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    nlist = max(1, min(nlist, 65536, 2 ** int(math.log2(max(1, n // MIN_POINTS_PER_CELL)))))
    m = min(64, max(1, d // 8))
    while d % m:
        m -= 1
    return f"IVF{nlist},Flat" if n < PQ_MIN_VECTORS else f"IVF{nlist},PQ{m}"


def default_refine(factory: str) -> int:
    """Candidates per result to re-score: lossy codes (PQ, SQ) rank approximately, full vectors exactly."""
    return 1 if re.search(r",\s*Flat\s*$", factory) else DEFAULT_REFINE


def trained_index(vectors: NpyFile, factory: str, metric: str, budget: Budget, seed: int = 0,
                  progress: bool = False) -> faiss.Index:
    """An empty index of `factory` trained on rows sampled uniformly (seeded) from the whole file."""
    try:
        index = faiss.index_factory(vectors.dim, factory, METRICS[metric])
    except RuntimeError as exc:
        raise EngineError(f"cannot build FAISS index '{factory}': {str(exc).strip().splitlines()[-1]}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or isinstance(index, faiss.IndexIVFPQR):
        raise EngineError(f"an on-disk index needs an IVF index type such as IVF4096,PQ64, not '{factory}'")
    sample = training_sample(vectors, ivf.nlist, budget, seed)
    with tqdm(total=1, desc=f"training {factory}", unit="step", disable=not progress) as bar:
        index.train(np.ascontiguousarray(sample, np.float32))
        bar.update()
    return index


def training_sample(vectors: NpyFile, nlist: int, budget: Budget, seed: int = 0) -> np.ndarray:
    """float32 rows picked uniformly at random (seeded) from the whole file: enough for k-means (64 a list) and PQ,
    at most what the budget allows. Sorted ids, so the file is read front to back."""
    wanted = min(vectors.rows, budget.sample_rows(vectors.dim), max(TRAIN_POINTS_PER_CELL * nlist, PQ_TRAIN_POINTS))
    ids = np.sort(np.random.default_rng(seed).choice(vectors.rows, wanted, replace=False))
    return np.asarray(vectors.pick(ids, budget.chunk_rows(vectors.dim)), np.float32)


def fill_shard(trained: np.ndarray, vectors_path: str, start: int, stop: int, chunk_rows: int, out: str,
               threads: int = 0) -> int:
    """Add rows [start, stop) of the raw file, with their row numbers as ids, to a clone of the serialised trained
    index and write it to `out`. Runs in this process or as a Ray task (then `threads` = 1: one core per task)."""
    if threads:
        faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(trained)
    vectors = NpyFile.open(vectors_path)
    for first, rows in vectors.chunks(chunk_rows, start, stop):
        index.add_with_ids(np.ascontiguousarray(rows, np.float32), np.arange(first, first + len(rows), dtype=np.int64))
    faiss.write_index(index, out)
    return stop - start


def fill_shards(trained: faiss.Index, vectors: NpyFile, shard_dir: Path, budget: Budget, shard_rows: int | None = None,
                ray_cpus: int = 0, progress: bool = False) -> list[str]:
    """The shard files, in id order. `ray_cpus` > 0: one Ray task per shard (Ray must be connected; the files must
    be on storage every node sees)."""
    code = faiss.extract_index_ivf(trained).code_size
    rows = shard_rows or budget.shard_rows(code, max(1, ray_cpus))
    if ray_cpus:
        rows = min(rows, max(1, -(-vectors.rows // ray_cpus)))  # at least one shard per CPU
    shard_dir.mkdir(parents=True, exist_ok=True)
    ranges = [(a, min(vectors.rows, a + rows)) for a in range(0, vectors.rows, rows)]
    names = [str(shard_dir / f"shard_{i:05d}.faiss") for i in range(len(ranges))]
    serialised = faiss.serialize_index(trained)
    chunk = budget.chunk_rows(vectors.dim) // max(1, ray_cpus)
    with tqdm(total=vectors.rows, desc="filling shards", unit="vec", unit_scale=True, disable=not progress) as bar:
        if not ray_cpus:
            for (a, b), name in zip(ranges, names):
                bar.update(fill_shard(serialised, str(vectors.path), a, b, chunk, name))
            return names
        import ray

        task = ray.remote(num_cpus=1, max_retries=3)(fill_shard)
        shared = ray.put(serialised)
        pending = [task.remote(shared, str(vectors.path), a, b, chunk, name, 1) for (a, b), name in zip(ranges, names)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(sum(ray.get(done)))
    return names


def merge_shards(trained: faiss.Index, shards: list[str], faiss_file: Path, ivfdata_file: Path,
                 progress: bool = False) -> None:
    """Merge the shards' lists into `ivfdata_file` (never into an index already on disk: `trained` is empty) and write
    the index that points at it to `faiss_file`, in the same directory (read with IO_FLAG_ONDISK_SAME_DIR)."""
    from faiss.contrib.ondisk import merge_ondisk

    if trained.ntotal:
        raise EngineError("internal: merging into a non-empty index")
    with tqdm(total=1, desc="merging shards", unit="step", disable=not progress) as bar:
        with faiss_quiet():
            merge_ondisk(trained, shards, str(ivfdata_file), shift_ids=False)
        faiss.write_index(trained, str(faiss_file))
        bar.update()


def exact_top_k(vectors: NpyFile, queries: np.ndarray, k: int, chunk_rows: int, metric: str = "ip",
                progress: bool = False) -> np.ndarray:
    """Ids of the exact top-k of each query over the whole file, streaming it chunk by chunk (float32 arithmetic,
    ties by id): the ground truth for tuning and benchmarks."""
    queries = np.ascontiguousarray(queries, np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    with tqdm(total=vectors.rows, desc="exact search", unit="vec", unit_scale=True, disable=not progress) as bar:
        for first, rows in vectors.chunks(chunk_rows):
            rows = np.asarray(rows, np.float32)
            scores = queries @ rows.T
            if metric != "ip":  # ranked by the negated squared distance: higher is better either way
                scores = 2 * scores - (rows * rows).sum(1)[None, :] - (queries * queries).sum(1)[:, None]
            scores = np.concatenate([best_scores, scores], axis=1)
            ids = np.concatenate([best_ids, np.broadcast_to(np.arange(first, first + len(rows)), (len(queries),
                                                                                                  len(rows)))], axis=1)
            order = _top(scores, ids, k)
            best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
            bar.update(len(rows))
    return best_ids


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Per row, the positions of the k highest scores, best first, ties by lower id."""
    keep = min(k, scores.shape[1])
    if scores.shape[1] > keep:
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    s, i = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
    order = np.array([np.lexsort((ii, -ss)) for ss, ii in zip(s, i)]).reshape(len(scores), -1)
    return np.take_along_axis(part, order, 1)


def tuning_queries(vectors: NpyFile, other: NpyFile | None, budget: Budget, seed: int = 0) -> np.ndarray:
    """Held-out queries: vectors of the other kind when there are any, else perturbed stored vectors."""
    rng = np.random.default_rng(seed)
    chunk = budget.chunk_rows(vectors.dim)
    def sample(f: NpyFile) -> np.ndarray:
        return np.asarray(f.pick(np.sort(rng.choice(f.rows, min(TUNING_QUERIES, f.rows), replace=False)), chunk),
                          np.float32)
    queries = sample(other) if other is not None and other.rows else None
    return held_out_queries(sample(vectors), queries, rng)


def tune(index: OnDiskIndex, vectors: NpyFile, queries: np.ndarray, target: float = DEFAULT_TARGET_RECALL,
         budget: Budget = Budget(), progress: bool = False) -> float:
    """Set the smallest nprobe whose re-ranked recall@10 against exact search reaches `target`, doubling the refine
    factor (up to REFINE_STEPS times) when nprobe would pass a quarter of the lists: past that the codes' ranking of
    the candidates is what misses, and a larger scan costs more than re-scoring more candidates. The highest tried
    if nothing reaches it; returns the recall reached."""
    exact = exact_top_k(vectors, queries, K, budget.chunk_rows(vectors.dim), index.metric, progress)
    nlist = faiss.extract_index_ivf(index.index).nlist
    for step in range(REFINE_STEPS + 1):
        last = step == REFINE_STEPS or index.refine == 1  # full codes: more candidates would not help
        nprobe, recall = raise_nprobe(index, queries, exact, target, nlist if last else max(1, nlist // 4))
        if recall >= target or last:
            break
        index.set_params({REFINE_PARAM: index.refine * 2})
    if recall < target:
        log.warning("%s with re-ranking x%d reaches recall@%d %.3f < target %.3f even at nprobe=%d", index.factory,
                    index.refine, K, recall, target, nprobe)
    return round(recall, 4)


__all__ = ["Budget", "DEFAULT_MEMORY_BUDGET", "REFINE_PARAM", "default_refine", "exact_top_k", "fill_shards",
           "merge_shards", "plan_ondisk", "trained_index", "training_sample", "tune", "tuning_queries"]
