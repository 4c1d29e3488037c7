"""Per-query retrieval results: for every caption (text→image) and every captioned image (image→text), the rank of
its first correct item, that item's score, and what ranked above it (`search eval --per-query`, the /eval page,
`search compare`).

Computed from an index's stored vectors with search/metrics.py's score blocks and tie rules (no model is loaded), so
that recall@k over these outcomes is exactly `search eval`'s: `PerQuery.recall(kind, k)` for k <= CURVE_MAX_K counts
the same hits (for ties="clip_benchmark", those torch.topk keeps, as CLIP_benchmark), beyond that rank <= k (by
position among equal scores, where torch.topk may keep others). A rank is metrics' rank: 1 + the wrong candidates
ranked ahead of the first correct one, the lower id first among equal scores ("strict": all equal-scoring wrong
candidates count); `beaten_by` lists those candidates in that order.
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np

from .errors import NoCaptionsError, QueryError
from .metrics import _hits, _own, _ranks, _ties, _topk_picks, check_ties, score_blocks
from .store import StoredIndex

KINDS = ("text_to_image", "image_to_text")
BEATEN_MAX = 10  # items above the gold one kept per query
CURVE_MAX_K = 50  # hits are counted with the tie rule for k = 1..this (recall@k curves); beyond, from the ranks


@dataclass(frozen=True)
class QueryOutcome:
    """One query. `query_id`: a caption id (text_to_image) or an image id (image_to_text); `query`: the caption text
    or the image path; `gold`: the correct image id, or the image's caption ids; `rank`: 1-based rank of the first
    correct item; `score`: that item's score; `beaten_by`: (id, score) of the items ranked above it, at most
    BEATEN_MAX, best first."""

    kind: str
    query_id: int
    query: str
    gold: tuple[int, ...]
    rank: int
    score: float
    beaten_by: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class PerQuery:
    """Every query's outcome, text_to_image ones first (by caption id), then image_to_text (by image id). The other
    fields are optional for code building one by hand: `ties` (the rule used), `hits` (per kind, [queries,
    CURVE_MAX_K] bool: hit at k = column + 1, by the tie rule), `image_paths` / `caption_texts` (by id, to name the
    items in `beaten_by`) and `name` (what the outcomes were measured on, e.g. the index path)."""

    outcomes: tuple[QueryOutcome, ...]
    ties: str = "clip_benchmark"
    hits: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    image_paths: tuple[str, ...] = field(default=(), repr=False)
    caption_texts: tuple[str, ...] = field(default=(), repr=False)
    name: str = ""

    def of(self, kind: str) -> tuple[QueryOutcome, ...]:
        _check_kind(kind)
        return tuple(outcome for outcome in self.outcomes if outcome.kind == kind)

    def ranks(self, kind: str) -> np.ndarray:
        """int64 ranks of `kind`'s queries, in the order of `of(kind)`."""
        return np.array([outcome.rank for outcome in self.of(kind)], np.int64)

    def hit(self, kind: str, k: int) -> np.ndarray:
        """bool per query of `kind` (order of `of(kind)`): is a correct item in the top k, by the tie rule."""
        if k < 1:
            raise QueryError(f"k must be at least 1 (got {k})")
        table = self.hits.get(kind)
        if table is not None and k <= table.shape[1]:
            return table[:, k - 1].copy()
        return self.ranks(kind) <= k

    def curve(self, kind: str, max_k: int = CURVE_MAX_K) -> dict[int, float]:
        """Recall@k in percent for k = 1..max_k (the recall@k curve)."""
        return {k: self.recall(kind, k) for k in range(1, max_k + 1)}

    def write_plots(self, directory: Path | str, suffix: str = ".png", label: str = "index") -> list[Path]:
        """recall_<direction>.<suffix>: the recall@k curve of each direction, in `directory` (created); the paths
        written. Imports matplotlib (search.plots) only here."""
        from . import plots

        if suffix not in plots.FORMATS:
            raise QueryError(f"plots are written as {' or '.join(plots.FORMATS)}, not '{suffix}'")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [plots.save(plots.recall_curves({label: self.curve(kind)}, f"{kind.replace('_to_', '→')} recall@k"),
                           directory / f"recall_{kind}{suffix}") for kind in KINDS]

    def recall(self, kind: str, k: int) -> float:
        """Recall@k in percent, 100 * hits / queries: `search eval`'s number."""
        hits = self.hit(kind, k)
        if not len(hits):
            raise NoCaptionsError("no queries of this kind, so recall cannot be measured")
        return 100 * int(hits.sum()) / len(hits)

    def item_name(self, kind: str, item_id: int) -> dict:
        """{"image": path} or {"caption": text} of a candidate of a `kind` query, when the names are known."""
        names, key = (self.image_paths, "image") if kind == "text_to_image" else (self.caption_texts, "caption")
        return {key: names[item_id]} if 0 <= item_id < len(names) else {}

    def outcome_json(self, outcome: QueryOutcome) -> dict:
        """One outcome as a JSON object (a line of `to_jsonl`)."""
        return {"kind": outcome.kind, "query_id": outcome.query_id, "query": outcome.query, "gold": list(outcome.gold),
                "rank": outcome.rank, "score": outcome.score,
                "beaten_by": [{"id": item, "score": score, **self.item_name(outcome.kind, item)}
                              for item, score in outcome.beaten_by]}

    def to_jsonl(self) -> Iterator[str]:
        """One JSON object per query, without a newline (`search eval --per-query FILE.jsonl`)."""
        for outcome in self.outcomes:
            yield json.dumps(self.outcome_json(outcome), ensure_ascii=False)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise QueryError(f"unknown direction '{kind}' (use {' or '.join(KINDS)})")


def per_query(index: StoredIndex, ties: str = "clip_benchmark") -> PerQuery:
    """The outcome of every query of an index's stored vectors. NoCaptionsError for an index without captions."""
    check_ties(ties)
    caption_image_ids = np.asarray(index.catalog.caption_image_ids(), np.int64)
    if len(caption_image_ids) == 0:
        raise NoCaptionsError("the index has no captions, so recall cannot be measured (index a captioned dataset)")
    images = np.asarray(index.vectors("images"), np.float32)
    captions = np.asarray(index.vectors("captions"), np.float32)
    records = index.catalog.captions(range(len(caption_image_ids)))
    texts = tuple(records[i].text for i in range(len(caption_image_ids)))
    paths = tuple(record.path for record in index.catalog.all_images())
    return outcomes_of(images, captions, caption_image_ids, texts, paths, ties, str(index.path))


def outcomes_of(images: np.ndarray, captions: np.ndarray, caption_image_ids: np.ndarray, caption_texts, image_paths,
                ties: str = "clip_benchmark", name: str = "") -> PerQuery:
    """per_query over vectors in memory (row = id); `caption_texts` / `image_paths` by id."""
    check_ties(ties)
    caption_image_ids = np.asarray(caption_image_ids, np.int64)
    images, captions = np.asarray(images, np.float32), np.asarray(captions, np.float32)
    captions_of: dict[int, list[int]] = {}
    for caption, image in enumerate(caption_image_ids.tolist()):
        captions_of.setdefault(image, []).append(caption)
    outcomes, hits = [], {}
    for kind, queries in (("text_to_image", "captions"), ("image_to_text", "images")):
        table = []
        for start, stop, scores in score_blocks(queries, images, captions):
            own = _own(queries, caption_image_ids, start, stop, scores.shape[1])
            ties_ = _ties(scores, own)
            ranks = _ranks(ties_, ties)
            ks = tuple(range(1, min(CURVE_MAX_K, scores.shape[1]) + 1))
            block_hits = _hits(ties_, ks, ties,
                               lambda row, k: bool(own[row, _topk_picks(scores[row], k)].any()))
            best = np.where(own, scores, -np.inf).max(axis=1)
            for row, beaten in zip(range(len(scores)), _beaten(scores, own, best, ranks, ties)):
                query = start + row
                if kind == "text_to_image":
                    gold, text = (int(caption_image_ids[query]),), caption_texts[query]
                elif query in captions_of:
                    gold, text = tuple(captions_of[query]), image_paths[query]
                else:
                    continue  # an image without captions is no query (as in search.metrics)
                outcomes.append(QueryOutcome(kind, query, text, gold, int(ranks[row]), float(best[row]), beaten))
                table.append(block_hits[row])
        hits[kind] = np.array(table, bool).reshape(len(table), -1)
    return PerQuery(tuple(outcomes), ties, hits, tuple(image_paths), tuple(caption_texts), name)


def _beaten(scores: np.ndarray, own: np.ndarray, best: np.ndarray, ranks: np.ndarray, ties: str
            ) -> Iterator[tuple[tuple[int, float], ...]]:
    """Per row, the (id, score) of the candidates ranked above the first correct one, best first (equal scores: the
    lower id first), at most BEATEN_MAX: those scoring higher, and the wrong ones scoring the same that rank ahead by
    the rule (strict: all of them; otherwise those with a lower id than the first correct one)."""
    ids = np.arange(scores.shape[1])
    tied_wrong = (scores == best[:, None]) & ~own
    if ties != "strict":
        first_own = np.where(own & (scores == best[:, None]), ids[None, :], scores.shape[1]).min(axis=1)
        tied_wrong &= ids[None, :] < first_own[:, None]
    ahead = np.where((scores > best[:, None]) | tied_wrong, scores, -np.inf)
    m = min(BEATEN_MAX, scores.shape[1])
    # the m-th best score ahead per row; a row's items above it all rank ahead, those equal to it by id
    kth = np.partition(ahead, scores.shape[1] - m, axis=1)[:, scores.shape[1] - m]
    for row in range(len(scores)):
        n = min(int(ranks[row]) - 1, m)
        if n <= 0:
            yield ()
            continue
        line = ahead[row]
        pick = np.concatenate([np.flatnonzero(line > kth[row]), np.flatnonzero(line == kth[row])])
        pick = pick[np.lexsort((pick, -line[pick]))][:n]
        yield tuple((int(i), float(line[i])) for i in pick)
