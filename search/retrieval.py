"""Running a `Query` against one index version: candidates, relevance, cutoff, dedupe, order, page.

The steps, each a small function below:
1. candidates: the vector ranking (the weighted sum of the terms' unit vectors, restricted to the filtered ids), the
   keyword ranking (SQLite FTS5 over captions and file names), or both fused by reciprocal rank fusion (hybrid);
2. relevance: the index's calibrated map from vector score to probability of relevance (search/relevance.py);
3. cutoff: `auto` keeps hits at or above the precision target stored with the calibration, a number P those with
   relevance ≥ P; an index without a calibration for the query kind falls back to a per-query score-gap cut;
4. dedupe: near-duplicates of a better hit are dropped (search/dedupe.py, at the index's calibrated threshold);
5. sort (relevance or date, newest first) and the page offset+1 .. offset+k.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .dedupe import collapse, tier_threshold
from .errors import NoCaptionsError, QueryError
from .query import CUTOFF_AUTO, Query, Term
from .relevance import Calibration, gap_cut
from .store import StoredIndex

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009; Weaviate, Elasticsearch and OpenSearch use 60)
CLOSEST_SHOWN = 3  # hits reported as "the closest were …" when the cutoff leaves nothing
FETCH_FACTOR = 4  # candidates fetched per result when dedupe or a cutoff may drop some
MIN_EXTRA = 50
KEYWORD_THREADS = 4  # hybrid queries running their keyword half at once (a server answers requests in parallel)


@dataclass(frozen=True)
class Candidate:
    """One ranked item before it becomes a Hit: id in the target's id space, its vector score (None in keyword mode),
    its relevance and which rankings found it."""

    id: int
    score: float | None
    relevance: float | None = None
    matched: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ranking:
    """The outcome of steps 1–5: the page, and what a user needs to read it."""

    page: list[Candidate]
    cutoff: float | None = None  # the relevance level applied (None: no cutoff)
    cutoff_rule: str | None = None  # "calibrated" or "score gap"
    closest: list[Candidate] = field(default_factory=list)  # when the cutoff left nothing: the best few anyway
    notes: tuple[str, ...] = ()


def term_kind(term: Term, target: str) -> str:
    """Which calibration judges a hit against one term: text→image, image→image or image→text
    (search/relevance.QUERY_KINDS; a text against captions, "text_text", is never calibrated)."""
    return calibration_kind("text" if term.text is not None else "image", target)


def calibration_kind(source: str, target: str) -> str:
    """The calibration kind of a `source` ("text" or "image") query against `target` ("images" or "captions")."""
    return f"{source}_{'image' if target == 'images' else 'text'}"


@dataclass(frozen=True)
class QueryVectors:
    """The combined query vector and each positive term's own unit vector with its calibration kind."""

    combined: np.ndarray
    positives: tuple[tuple[np.ndarray, str], ...]
    single: bool  # one term only: the combined vector is that term's vector


def combine(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The unit-length weighted sum of unit vectors (rclip's --add/--subtract, Marqo's weighted terms)."""
    total = np.zeros_like(np.asarray(vectors[0], np.float32))
    for vector, weight in zip(vectors, weights):
        vector = np.asarray(vector, np.float32)
        total += weight * vector / max(float(np.linalg.norm(vector)), 1e-12)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the terms cancel out: their weighted sum is zero")
    return total / norm


def query_vectors(vectors: list[np.ndarray], query: Query) -> QueryVectors:
    """The vectors `rank` needs from the terms' vectors (in `query.terms` order)."""
    positives = tuple((np.asarray(v, np.float32) / max(float(np.linalg.norm(v)), 1e-12), term_kind(t, query.target))
                      for v, t in zip(vectors, query.terms) if t.weight > 0)
    return QueryVectors(combine(vectors, [t.weight for t in query.terms]), positives, len(query.terms) == 1)


def rank(index: StoredIndex, query: Query, vectors: QueryVectors | None, allowed: np.ndarray | None) -> Ranking:
    """Steps 1–5 for `query` on the one version `index`. `vectors`: the query's (None in keyword mode); `allowed`
    the ids of the target that the filters admit (None: all)."""
    if query.target == "captions" and index.manifest.n_captions == 0:
        raise NoCaptionsError("this index has no captions (it was built from images alone); search images instead")
    need = query.offset + query.k
    spare = query.dedupe or query.cutoff is not None or query.sort == "date" or query.mode == "hybrid"
    fetch = max(need * FETCH_FACTOR, need + MIN_EXTRA) if spare else need
    notes: list[str] = []
    vector = None if vectors is None else vectors.combined
    candidates = _candidates(index, query, vector, allowed, fetch, notes)
    candidates = _with_relevance(index, query.target, vectors, candidates)
    level, rule, kept = _cut(index, query, vectors, candidates, notes)
    if query.dedupe and query.target == "images":
        kept = _deduped(index, kept, notes)
    if query.sort == "date" and query.target == "images":
        taken = index.catalog.taken([c.id for c in kept])
        kept = sorted(kept, key=lambda c: -(taken.get(c.id) or float("-inf")))  # stable: ties keep relevance order
    closest = candidates[:CLOSEST_SHOWN] if not kept and candidates else []
    return Ranking(kept[query.offset:need], level, rule, closest, tuple(notes))


def _candidates(index: StoredIndex, query: Query, vector: np.ndarray | None, allowed: np.ndarray | None,
                fetch: int, notes: list[str]) -> list[Candidate]:
    if query.mode == "vector":
        return _vector_ranking(index, query.target, vector, allowed, fetch, mark=False)
    if query.mode == "keyword":
        return _keyword_ranking(index, query, allowed, fetch)
    # hybrid: the keyword ranking (SQLite, which lets go of the GIL while it steps) runs on another core meanwhile:
    # FAISS searches one query on one thread, so the two rankings cost about the slower of them, not their sum
    keywords = _keyword_pool().submit(_keyword_ranking, index, query, allowed, fetch)
    try:
        vectors = _vector_ranking(index, query.target, vector, allowed, fetch)
    finally:
        found = keywords.result()
    return _fused(index, query.target, vector, vectors, found)


@functools.lru_cache(maxsize=1)
def _keyword_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=KEYWORD_THREADS, thread_name_prefix="keyword-search")


def _vector_ranking(index: StoredIndex, target: str, vector: np.ndarray, allowed: np.ndarray | None,
                    fetch: int, mark: bool = True) -> list[Candidate]:
    """The vector ranking; `mark` records "vector" in each candidate's `matched` (for hybrid's highlighting)."""
    vector_index = index.images if target == "images" else index.captions
    scores, ids = vector_index.search(vector[None], fetch, allowed=allowed)
    matched = ("vector",) if mark else ()
    return [Candidate(int(i), float(s), matched=matched) for s, i in zip(scores[0], ids[0]) if i >= 0]


def _keyword_ranking(index: StoredIndex, query: Query, allowed: np.ndarray | None, fetch: int) -> list[Candidate]:
    words = " ".join(t.text for t in query.texts if t.weight > 0)
    if not words:
        raise QueryError("keyword and hybrid search need a text term")
    exclude = [t.text for t in query.texts if t.weight < 0]
    if query.target == "images":
        found = index.catalog.keyword_images(words, fetch, allowed, exclude=exclude)
        return [Candidate(int(i), None, matched=tuple(fields)) for i, _, fields in found]
    found = index.catalog.keyword_captions(words, fetch if allowed is None else index.manifest.n_captions,
                                           exclude=exclude)
    if allowed is not None:  # caption ids here: the filters' images already mapped to their captions
        admitted = set(allowed.tolist())
        found = [f for f in found if f[0] in admitted][:fetch]
    return [Candidate(int(i), None, matched=("caption",)) for i, _, _ in found]


def _fused(index: StoredIndex, target: str, vector: np.ndarray, vectors: list[Candidate],
           keywords: list[Candidate]) -> list[Candidate]:
    """Reciprocal rank fusion of the two rankings; keyword-only hits get their exact vector score (for relevance)."""
    fused: dict[int, float] = {}
    matched: dict[int, tuple[str, ...]] = {}
    for ranking in (vectors, keywords):
        for position, candidate in enumerate(ranking):
            fused[candidate.id] = fused.get(candidate.id, 0.0) + 1.0 / (RRF_K + position + 1)
            matched[candidate.id] = matched.get(candidate.id, ()) + candidate.matched
    scores = {c.id: c.score for c in vectors}
    missing = np.array([i for i in fused if i not in scores], np.int64)
    if len(missing):
        scores.update(zip(missing.tolist(), (_rows(index, target, missing) @ vector).tolist()))
    order = sorted(fused, key=lambda i: (-fused[i], -scores[i], i))
    return [Candidate(i, float(scores[i]), matched=matched[i]) for i in order]


def calibration(index: StoredIndex) -> Calibration:
    """The index version's calibration, parsed once per opened version."""
    cached = getattr(index, "_calibration", None)
    if cached is None:
        cached = Calibration.from_dict(index.manifest.relevance)
        index._calibration = cached  # a plain attribute on this version's object: gone with it
    return cached


def _with_relevance(index: StoredIndex, target: str, vectors: QueryVectors | None,
                    candidates: list[Candidate]) -> list[Candidate]:
    """Each scored candidate's calibrated relevance: for one term, the map of its kind applied to its score; for a
    compound query, the smallest relevance over the positive terms, each judged on its own score against the hit
    (a hit is relevant when it is relevant to every part asked for; "without" terms only steer the ranking, and the
    combined vector's score has no calibrated scale). None when a kind is not calibrated."""
    scored = [c for c in candidates if c.score is not None]
    cal = calibration(index)
    if not scored or vectors is None or not all(cal.calibrated(kind) for _, kind in vectors.positives):
        return candidates
    if vectors.single:
        relevance = cal.relevance(vectors.positives[0][1], np.array([c.score for c in scored], np.float32))
    else:
        rows = _rows(index, target, np.array([c.id for c in scored]))
        relevance = np.min([cal.relevance(kind, rows @ vector) for vector, kind in vectors.positives], axis=0)
    levels = dict(zip((c.id for c in scored), relevance.tolist()))
    return [Candidate(c.id, c.score, levels.get(c.id), c.matched) for c in candidates]


def _rows(index: StoredIndex, target: str, ids: np.ndarray) -> np.ndarray:
    """float32 vectors of `ids` (any order), read in id order: memory-mapped files are paged in sequentially."""
    order = np.argsort(ids)
    rows = np.empty((len(ids), index.manifest.dim), np.float32)
    rows[order] = np.asarray(index.vectors(target)[ids[order]], np.float32)
    return rows


def _cut(index: StoredIndex, query: Query, vectors: QueryVectors | None, candidates: list[Candidate],
         notes: list[str]) -> tuple[float | None, str | None, list[Candidate]]:
    """(level applied, rule, the candidates kept)."""
    if query.cutoff is None:
        return None, None, candidates
    if vectors is None:
        notes.append("keyword search has no scores to cut: every match is kept")
        return None, None, candidates
    cal = calibration(index)
    missing = [kind for _, kind in vectors.positives if not cal.calibrated(kind)]
    if not missing:
        level = cal.target if query.cutoff == CUTOFF_AUTO else float(query.cutoff)
        return level, "calibrated", [c for c in candidates if c.relevance is not None and c.relevance >= level]
    keep = gap_cut(np.array([c.score for c in candidates], np.float32)) if candidates else 0
    notes.append(f"this index has no calibration for {missing[0].replace('_', '→')} queries (it needs captions): "
                 "kept the hits above the largest score gap")
    return None, "score gap", candidates[:keep]


def _deduped(index: StoredIndex, candidates: list[Candidate], notes: list[str]) -> list[Candidate]:
    tier = tier_threshold(index.manifest.near_duplicates, "near")
    if not tier.calibrated:
        notes.append(f"no near-duplicate calibration in this index: dedupe used the default threshold "
                     f"{tier.threshold}")
    if len(candidates) < 2:
        return candidates
    ids = np.array([c.id for c in candidates])
    return [candidates[i] for i in collapse(ids, _rows(index, "images", ids), tier.threshold)]
