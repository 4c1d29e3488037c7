"""ANN recall you can see: the index of each kind with what its manifest entry says about it, at build and update.

Every commit records per kind (manifest.indexes[kind]) recall@10 of the index in use against exact search, measured
on held-out queries (search/index_choice.held_out_queries with seed 0: up to 500 vectors of the other kind, else
perturbed copies of stored vectors; `recall_queries` says how many), `recall_measured` ("build" or "update"; when:
the manifest's `created`), `trained_on` (the vectors present when the IVF quantiser was trained), and
`added_since_training` (vectors added by updates since then; removals are not subtracted). Flat indexes are exact:
recall 1.0, `exact: true`, nothing trained or measured.

An update keeps the previous index's trained quantiser (and its nprobe) instead of training again: the catalog ids
of an update follow the new sample order, so the kept index is emptied (`reset`, which keeps the trained state) and
every current vector is added under its new id; recall@10 is then measured again. It trains again, saying why in one
log line, when that recall is below the target or when the automatic plan for the new size is another index. Measured
(60,000 clustered 128-d vectors, IVF1024,Flat at nprobe 4, 2 cores): adding 10-100 % more vectors of the same
distribution kept recall 0.991-0.997 and took ~0.5 s against ~4-7 s to train and tune again; adding vectors of new
topics dropped it to 0.93 (+10 %), 0.83 (+30 %), 0.60 (+100 %), where retraining restores ~0.99.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from search.errors import EngineError
from search.index_choice import (IndexOptions, IndexReport, build_tuned, estimate_bytes, held_out_queries,
                                 measure_recall, plan_factory)
from search.layout import FAISS_FILES, VECTOR_FILES
from search.manifest import Manifest, read_manifest
from search.vector_index import VectorIndex

log = logging.getLogger(__name__)

SEED = 0  # the held-out queries and the training sample: the same at every measurement of the same vectors
HASH_CHUNK_ROWS = 65_536  # rows hashed at a time when counting the vectors an update added


@dataclass(frozen=True)
class Previous:
    """The index an update replaces (still in place while the new one is committed)."""
    directory: Path
    manifest: Manifest

    def entry(self, kind: str) -> dict:
        return self.manifest.indexes.get(kind, {})

    def count(self, kind: str) -> int:
        return self.manifest.n_images if kind == "images" else self.manifest.n_captions


def previous_index(out: Path, job: dict) -> Previous | None:
    """For an update (`job["update"]`), the index in `out` it replaces; None for a build or when there is none."""
    if not job.get("update"):
        return None
    try:
        return Previous(Path(out), read_manifest(out))
    except EngineError:
        return None


def index_for(kind: str, vectors: np.ndarray, queries: np.ndarray | None, options: IndexOptions, metric: str,
              previous: Previous | None = None) -> tuple[VectorIndex, dict]:
    """The index of `kind` over `vectors` (ids = rows) and its manifest entry (with "factory"). `queries`: vectors of
    the other kind (held-out queries are drawn from them); `previous`: the index an update replaces (its trained
    quantiser is kept while recall@10 stays at the target)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    factory = options.factory
    if previous is not None and factory is None:
        kept = _keep_trained(kind, vectors, queries, options, metric, previous)
        if kept is not None:
            return kept[0], with_history(kept[1], n, previous.entry(kind).get("recall_history", []))
        factory = _chosen_factory(previous, kind, d)
    index, report = build_tuned(vectors, factory, options.memory_budget, options.target_recall, queries, metric, SEED)
    return index, with_history(entry(report, "update" if previous is not None else "build",
                                     0 if report.trained_on else None, options.target_recall), n, [])


def with_history(record: dict, n: int, history: list) -> dict:
    """`record` with `recall_history`: [share of vectors added since training, recall@10] per measurement since the
    index was last trained (the ANN recall plot), at most MAX_HISTORY; exact indexes have none."""
    if record.get("exact") or record.get("recall_at_10") is None:
        return record
    share = round((record.get("added_since_training") or 0) / n, 4) if n else 0.0
    return {**record, "recall_history": [*history, [share, record["recall_at_10"]]][-MAX_HISTORY:]}


MAX_HISTORY = 100  # measurements kept per index (one per build or update)


def entry(report: IndexReport, measured: str, added_since_training: int | None, target: float) -> dict:
    """The manifest entry of an index report: Flat marked exact; the others with when recall was measured, the
    share added since training and the target the recall was tuned to."""
    data = asdict(report)
    if report.factory == "Flat":
        return {**data, "exact": True}
    return {**data, "recall_measured": measured if report.recall_at_10 is not None else None,
            "added_since_training": added_since_training, "target_recall": target}


def _chosen_factory(previous: Previous, kind: str, d: int) -> str | None:
    """What an update trains: None (plan again for the new size) when the previous factory is what the plan chose
    for its size, else the previous factory (chosen with --index-type or a memory budget, which `update` has not)."""
    factory = previous.manifest.factory(kind)
    trained_on = previous.entry(kind).get("trained_on") or previous.count(kind)
    return None if trained_on == 0 or factory == plan_factory(trained_on, d) else factory


def _keep_trained(kind: str, vectors: np.ndarray, queries: np.ndarray | None, options: IndexOptions, metric: str,
                  previous: Previous) -> tuple[VectorIndex, dict] | None:
    """The previous trained IVF index emptied and filled with `vectors`, with its entry, when its recall@10 at the
    previous parameters reaches the target; None (after one log line saying why) when it must be trained again."""
    factory, old = previous.manifest.factory(kind), previous.entry(kind)
    n, d = vectors.shape
    if not factory.startswith("IVF") or old.get("on_disk") or n == 0 or previous.manifest.metric != metric:
        return None
    trained_on = old.get("trained_on") or previous.count(kind)
    if factory == plan_factory(trained_on, d) and plan_factory(n, d) != factory:
        log.info("%s index: training %s again: %d vectors now (%d when trained) plan %s", kind, factory, n,
                 trained_on, plan_factory(n, d))
        return None
    try:
        raw = faiss.read_index(str(previous.directory / FAISS_FILES[kind]))
    except RuntimeError:
        return None
    if raw.d != d:
        return None
    raw.reset()  # the lists go, the trained quantiser (and codebooks) stay
    raw.add(vectors)
    index = VectorIndex(raw, factory, metric, old.get("params"))
    held_out = held_out_queries(vectors, queries, np.random.default_rng(SEED))
    recall = round(measure_recall(index, vectors, held_out), 4)
    added = min(n, (old.get("added_since_training") or 0) + count_new(vectors, previous.directory / VECTOR_FILES[kind]))
    if recall < options.target_recall:
        log.info("%s index: training %s again: recall@10 %.3f < target %.3f with the quantiser trained on %d vectors "
                 "(%.0f%% of the %d added since)", kind, factory, recall, options.target_recall, trained_on,
                 100 * added / n, n)
        return None
    log.info("%s index: kept %s trained on %d vectors (%.0f%% of %d added since): recall@10 %.3f against exact search",
             kind, factory, trained_on, 100 * added / n, n, recall)
    report = IndexReport(factory, dict(index.params), recall, estimate_bytes(factory, n, d), trained_on, len(held_out))
    return index, entry(report, "update", added, options.target_recall)


def count_new(vectors: np.ndarray, previous_file: Path) -> int:
    """How many rows of `vectors` are not rows of the vectors file `previous_file` (bit for bit: an update copies
    the vectors it keeps); all of them when that file cannot be read as float32 rows of the same width."""
    try:
        old = np.load(previous_file, mmap_mode="r")
    except (OSError, ValueError):
        return len(vectors)
    if old.dtype != np.float32 or old.ndim != 2 or old.shape[1] != vectors.shape[1]:
        return len(vectors)
    return int((~np.isin(row_keys(vectors), row_keys(old))).sum())


def row_keys(rows: np.ndarray) -> np.ndarray:
    """A 64-bit key per row from its bits (a multiply-add hash: equal rows, equal keys; different rows collide with
    probability ~2^-64), a chunk of rows at a time."""
    d = rows.shape[1]
    multipliers = np.random.default_rng(SEED).integers(1, 2 ** 63, size=d, dtype=np.uint64) | np.uint64(1)
    keys = np.empty(len(rows), np.uint64)
    for start in range(0, len(rows), HASH_CHUNK_ROWS):
        words = np.ascontiguousarray(rows[start:start + HASH_CHUNK_ROWS], np.float32).view(np.uint32)
        keys[start:start + len(words)] = (words.astype(np.uint64) * multipliers).sum(axis=1, dtype=np.uint64)
    return keys


def with_on_disk_records(reports: dict, counts: dict, measured: str, target: float) -> dict:
    """Reports of on-disk indexes (indexer/ondisk_build.py: trained and tuned on every commit) completed like the
    others: Flat marked exact; trained_on = the vectors present, nothing added since."""
    completed = {}
    for kind, report in reports.items():
        if report.get("factory") == "Flat":
            completed[kind] = {**report, "exact": True}
        else:
            completed[kind] = {"trained_on": counts[kind], **report, "recall_measured": measured,
                               "added_since_training": 0, "target_recall": target}
    return completed
