"""Retrieval recall@k, computed exactly as CLIP_benchmark's zero-shot retrieval computes it.

text→image: a caption is a hit at k when its own image is among the top k images. image→text: an image is a hit at k
when any of its captions is among the top k captions. Scores are the float32 matrix `captions @ images.T` multiplied by
torch, in blocks that round exactly like CLIP_benchmark's single product (numpy's BLAS rounds differently, and can
even give two identical vectors different scores, which decides ties).

Equal scores are common: datasets repeat captions word for word, so captions of different images have identical
vectors. `ties` says which of the candidates tied at the k-th place make the top k:
- "clip_benchmark" (default): the ones `torch.topk(scores, k)` keeps, as CLIP_benchmark's `recall_at_k` does. On CPU,
  when k * 64 <= the number of candidates, torch.topk keeps a heap of k candidates, filled in index order, that only a
  strictly higher score enters, but which of several equal scores it drops depends on their places in the heap; with
  fewer candidates it uses std::nth_element. Mostly the lower indexes, then, but not always: rows with such a tie
  are handed to torch.topk itself.
- "position": the lower candidate index ranks first, always.
- "strict": every equal-scoring wrong candidate ranks ahead of the correct one, so a collapsed model cannot score by
  tying.
A rank (mean and median rank) is 1 + the number of wrong candidates ranked ahead of the first correct one, by position
among equal scores ("strict": all equal-scoring wrong candidates count).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Iterator, NamedTuple

import faiss
import numpy as np

from .errors import NoCaptionsError, QueryError
from .recall import Recall, RetrievalMetrics, RetrievalRecall

KS = (1, 5, 10)
TIES = ("clip_benchmark", "position", "strict")
_BLOCK_SCORES = 1 << 24  # score-matrix entries computed at once (64 MB of float32)
# every block has the same number of rows, at least this many: MKL multiplies products of fewer than ~12 rows by other
# kernels, which round differently from the one-product matrix CLIP_benchmark computes
_MIN_BLOCK = 128
_FETCH_MARGIN = 16  # candidates asked of a FAISS index beyond max(ks), so that ties at the k-th place are seen whole
_NOT_FOUND = np.iinfo(np.int64).max


def check_ties(ties: str) -> None:
    if ties not in TIES:
        raise QueryError(f"unknown tie rule '{ties}' (use {' or '.join(TIES)})")


def _tensor(vectors: np.ndarray):
    """A torch-allocated float32 copy, like the tensors CLIP_benchmark multiplies."""
    import torch  # here, not at module level: the rest of the search package runs without loading torch

    vectors = np.asarray(vectors, np.float32)
    tensor = torch.empty(vectors.shape, dtype=torch.float32)
    tensor.numpy()[...] = vectors
    return tensor


def score_blocks(queries: str, image_vectors: np.ndarray, caption_vectors: np.ndarray
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, scores) covering all query rows ('captions' or 'images') in order: scores[q, c] is the score of
    query start + q against candidate c of the other kind, bitwise the entry of CLIP_benchmark's `captions @ images.T`
    (its transpose for image queries)."""
    images, captions = _tensor(image_vectors), _tensor(caption_vectors)
    n, others = (len(captions), len(images)) if queries == "captions" else (len(images), len(captions))
    size = min(n, max(_MIN_BLOCK, _BLOCK_SCORES // max(others, 1)))
    for start in range(0, n, size):
        first = min(start, n - size)  # the last block overlaps its predecessor rather than being smaller
        if queries == "captions":
            block = (captions[first:first + size] @ images.T).numpy()
        else:
            block = (captions @ images[first:first + size].T).numpy().T
        yield start, min(start + size, n), block[start - first:]


def _own(queries: str, caption_image_ids: np.ndarray, start: int, stop: int, n_candidates: int) -> np.ndarray:
    """[stop - start, n_candidates] bool: which candidates are correct for queries start..stop."""
    if queries == "captions":
        return np.arange(n_candidates)[None, :] == caption_image_ids[start:stop, None]
    return caption_image_ids[None, :] == np.arange(start, stop)[:, None]


class _Ties(NamedTuple):
    """Per query, about the best-scoring correct candidate (score `best`): how many candidates score higher, how many
    correct and wrong ones score the same, and how many of those wrong ones have a lower id than the first such
    correct one."""
    found: np.ndarray  # a correct candidate is among the columns at all
    above: np.ndarray
    tied_own: np.ndarray
    tied_wrong: np.ndarray
    before: np.ndarray


def _ties(scores: np.ndarray, own: np.ndarray, ids: np.ndarray | None = None) -> _Ties:
    """`ids`: the candidate id of each column (default: the column number)."""
    best = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)
    at_best = scores == best
    n_at_best = at_best.sum(axis=1)
    found = best[:, 0] > -np.inf
    tied_own = found.astype(np.int64)
    tied_wrong, before = np.zeros(len(scores), np.int64), np.zeros(len(scores), np.int64)
    rows = np.flatnonzero(found & (n_at_best > 1))  # rare: the full comparisons are made for these rows only
    if len(rows):
        ids = np.arange(scores.shape[1])[None, :] if ids is None else ids[rows]
        own_at, wrong_at = at_best[rows] & own[rows], at_best[rows] & ~own[rows]
        first_own = np.where(own_at, ids, _NOT_FOUND).min(axis=1, keepdims=True)
        tied_own[rows], tied_wrong[rows] = own_at.sum(axis=1), wrong_at.sum(axis=1)
        before[rows] = (wrong_at & (ids < first_own)).sum(axis=1)
    return _Ties(found, (scores > best).sum(axis=1), tied_own, tied_wrong, before)


def _ranks(ties_: _Ties, ties: str) -> np.ndarray:
    """1-based rank of the first correct candidate: strict, or else by position (the lower id first)."""
    return 1 + ties_.above + (ties_.tied_wrong if ties == "strict" else ties_.before)


def _hits(ties_: _Ties, ks: tuple[int, ...], ties: str, topk_hit: Callable[[int, int], bool]) -> np.ndarray:
    """[queries, len(ks)] bool. `topk_hit(row, k)`: whether torch.topk's k picks for that row include a correct one."""
    hits = np.zeros((len(ties_.above), len(ks)), bool)
    for j, k in enumerate(ks):
        if ties != "clip_benchmark":
            hit = _ranks(ties_, ties) <= k
        else:
            room = k - ties_.above  # places left in the top k for the candidates tied with the best correct one
            hit = (room > 0) & ((ties_.tied_wrong == 0) | (room >= ties_.tied_own + ties_.tied_wrong))
            # equal scores straddle the k-th place: which of them torch.topk keeps follows from its heap, not a rule
            for row in np.flatnonzero((room > 0) & ~hit & ties_.found):
                hit[row] = topk_hit(int(row), k)
        hits[:, j] = hit & ties_.found
    return hits


def _topk_picks(scores: np.ndarray, k: int) -> np.ndarray:
    """The candidates CLIP_benchmark's `torch.topk(scores, k)` picks for one row of scores."""
    import torch

    return torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k).indices.numpy()


def _direction(queries: str, images: np.ndarray, captions: np.ndarray, caption_image_ids: np.ndarray,
               ks: tuple[int, ...], ties: str, index=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ranks, hits [queries, len(ks)], hits through `index` or None) of every 'captions' (text→image) or 'images'
    (image→text) query; images without captions are left out. One pass over the scores serves both."""
    query_vectors = captions if queries == "captions" else images
    n = len(query_vectors)
    ranks, hits = np.empty(n, np.int64), np.empty((n, len(ks)), bool)
    index_hits = None if index is None else np.empty((n, len(ks)), bool)
    if index is not None:
        rounding = _rounding_bound(query_vectors, images if queries == "captions" else captions)
    for start, stop, scores in score_blocks(queries, images, captions):
        own = _own(queries, caption_image_ids, start, stop, scores.shape[1])
        ties_ = _ties(scores, own)
        ranks[start:stop] = _ranks(ties_, ties)
        hits[start:stop] = _hits(ties_, ks, ties, lambda row, k: bool(own[row, _topk_picks(scores[row], k)].any()))
        if index is not None:
            index_hits[start:stop] = _index_hits(index, query_vectors[start:stop], scores, own, ks, ties,
                                                 rounding[start:stop])
    if queries == "images":
        keep = np.bincount(caption_image_ids, minlength=n) > 0
        ranks, hits = ranks[keep], hits[keep]
        index_hits = None if index_hits is None else index_hits[keep]
    return ranks, hits, index_hits


def _recall(hits: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    """R@k as the exact percentage 100 * hits / queries (unrounded, to compare with other tools)."""
    return {k: 100 * int(np.sum(hits[:, j])) / len(hits) for j, k in enumerate(ks)}


def summarize(ranks: np.ndarray, hits: np.ndarray, ks: tuple[int, ...] = KS) -> Recall:
    return Recall(_recall(hits, ks), round(float(np.mean(ranks)), 4), float(np.median(ranks)))


def repeated_texts(texts: Iterable[str]) -> dict:
    """How many distinct caption texts occur more than once (word for word), and how many captions they make up:
    identical texts of different images get identical vectors, so these are where ties come from."""
    repeats = [count for count in Counter(texts).values() if count > 1]
    return {"repeated_caption_texts": len(repeats), "captions_with_repeated_text": int(sum(repeats))}


def _rounding_bound(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Per query, a bound on how far two float32 computations of its inner product with any candidate can differ:
    each is within gamma_d * |q| * |x| of the true value, whatever the order of summation."""
    unit = np.finfo(np.float32).eps / 2
    gamma = queries.shape[1] * unit / max(1 - queries.shape[1] * unit, 1e-3)
    largest = float(np.linalg.norm(candidates, axis=1).max()) if len(candidates) else 0.0
    return 2 * gamma * np.linalg.norm(queries, axis=1) * largest * 1.01


def _holds_full_vectors(index) -> bool:
    """Whether an index scores with the full stored vectors (its scores are then the exact ones up to rounding)."""
    raw = faiss.downcast_index(getattr(index, "index", index))
    return (getattr(index, "metric", "ip") == "ip"
            and isinstance(raw, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat)))


def _index_hits(index, queries: np.ndarray, exact: np.ndarray, own: np.ndarray, ks: tuple[int, ...], ties: str,
                rounding: np.ndarray) -> np.ndarray:
    """[queries, len(ks)] bool: hits among what `index` returns for each query. `exact` and `own` are the queries'
    exact score and correctness rows over all candidates; `rounding` bounds |FAISS score - exact score| per query."""
    rescore = _holds_full_vectors(index)
    kmax, total = max(ks), index.ntotal
    hits = np.zeros((len(queries), len(ks)), bool)
    rows = np.arange(len(queries))
    fetch = min(total, kmax + _FETCH_MARGIN)
    while len(rows):
        faiss_scores, found = index.search(queries[rows], fetch)
        if getattr(index, "metric", "ip") != "ip":
            faiss_scores = -faiss_scores  # squared distances: smaller is better
        valid = found >= 0
        safe = np.maximum(found, 0)
        # indexes holding full vectors are re-scored exactly: FAISS's own arithmetic rounds differently, which would
        # split ties and reorder near-ties; quantised indexes rank by their own scores, and ties there by position
        scores = np.where(valid, exact[rows[:, None], safe] if rescore else faiss_scores, -np.inf)
        right = own[rows[:, None], safe] & valid
        rule = ties if rescore or ties == "strict" else "position"
        ids = np.where(valid, found, _NOT_FOUND)

        def topk_hit(row: int, k: int) -> bool:  # torch.topk over the exact row, counting what the index returned
            picked = _topk_picks(exact[rows[row]], k)
            return bool((own[rows[row], picked] & np.isin(picked, ids[row])).any())
        block = _hits(_ties(scores, right, ids), ks, rule, topk_hit)
        # settled unless something not returned could still reach the top kmax: FAISS returned all it reached, or the
        # kmax-th score beats the last one returned (by more than rounding when re-scored)
        settled = (fetch >= total) | ~valid.all(axis=1)
        if kmax <= fetch < total:
            kth = -np.sort(-scores, axis=1)[:, kmax - 1]
            settled |= kth > faiss_scores[:, -1] + (rounding[rows] if rescore else 0)
        hits[rows[settled]] = block[settled]
        rows = rows[~settled]
        fetch = min(total, 2 * fetch)
    return hits


def retrieval_metrics(image_vectors: np.ndarray, caption_vectors: np.ndarray, caption_image_ids: np.ndarray,
                      ks: tuple[int, ...] = KS, ties: str = "clip_benchmark",
                      indexes: tuple | None = None) -> RetrievalMetrics:
    """Recall@k (percent), mean and median rank in both directions (`to_json()`: `search eval --json`'s shape).
    With `indexes` (the FAISS image and caption indexes) also recall through them, as `index_search` (see
    index_recall). NoCaptionsError without captions."""
    check_ties(ties)
    caption_image_ids = np.asarray(caption_image_ids, np.int64)
    if len(caption_vectors) == 0:
        raise NoCaptionsError("the index has no captions, so recall cannot be measured (index a captioned dataset)")
    images, captions = np.asarray(image_vectors, np.float32), np.asarray(caption_vectors, np.float32)
    exact, searched = {}, {}
    for direction, queries, index in (("text_to_image", "captions", indexes[0] if indexes else None),
                                      ("image_to_text", "images", indexes[1] if indexes else None)):
        ranks, hits, index_hits = _direction(queries, images, captions, caption_image_ids, ks, ties, index)
        exact[direction] = summarize(ranks, hits, ks)
        if index_hits is not None:
            searched[direction] = Recall(_recall(index_hits, ks))
    return RetrievalMetrics(RetrievalRecall(**exact), int(len(images)), int(len(captions)), ties,
                            RetrievalRecall(**searched) if indexes else None)


def index_recall(image_index, caption_index, image_vectors: np.ndarray, caption_vectors: np.ndarray,
                 caption_image_ids: np.ndarray, ks: tuple[int, ...] = KS,
                 ties: str = "clip_benchmark") -> RetrievalRecall:
    """Recall@k when the FAISS indexes in use answer the queries (approximate ones may miss), ranked like the exact
    numbers so that an exact index gives exactly the exact numbers: FAISS is asked for more than max(ks) candidates
    (for more while equal scores straddle the last one returned), and the candidates of indexes holding full vectors
    are re-scored exactly. Ranks beyond max(ks) are not known, so only recall is reported."""
    return retrieval_metrics(image_vectors, caption_vectors, caption_image_ids, ks, ties,
                             (image_index, caption_index)).index_search
