"""The evaluation page: where retrieval fails on the served index, and how a second index compares.

GET /eval                                  the page (for an index without captions, a page saying so)
GET /api/eval?kind=text_to_image&length=&feature=&language=&fell=&offset=&limit=
                                           per-query outcomes, worst first: the query, its gold item(s), what ranked
                                           above it (with scores), the rank; filters as the page's
GET /api/eval/summary                      recall@1/5/10 both directions, recall@5 per caption feature group, and,
                                           with `--compare-index`, the comparison (search/compare.py)
GET /eval/plot/recall.png                  recall@k curves of both directions (search/plots.py)
GET /eval/plot/compare/KIND/recall.png, …/ranks.png   with `--compare-index`: the two indexes' curves, rank scatter

Per-query results (search/per_query.py, from the stored vectors: no model call) are computed once per index
version — of each served index and of the compared one — and kept until either changes. Every route takes
`index=NAME` on a server with several indexes; `--compare-index` compares with the default one.
"""
from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from flask import Blueprint, abort, current_app, jsonify, render_template, request, send_file, url_for
from werkzeug.exceptions import BadRequest

from search.compare import Comparison, compare
from search.errors import EngineError, NoCaptionsError, QueryError
from search.layout import MANIFEST_NAME
from search.per_query import CURVE_MAX_K, KINDS, PerQuery, QueryOutcome, per_query
from search.query_features import (GROUPS, LABELS, LANGUAGES, LENGTH_KEYS, WORD_GROUPS, WORD_KEYS, QueryFeatures,
                                   query_features)
from search.store import StoredIndex, open_index

from .engine import EXTENSION_KEY, engine
from .plot_pages import has_ann_plot, training_record

eval_pages = Blueprint("eval", __name__, template_folder="templates")

STATE_KEY = "image_search_eval"
TABLE_KS = (1, 5, 10)
SLICE_K = 5  # slices compare recall@5 of a group with recall@5 of all captions
FELL = (1, 5, 10, 100)  # the failure list's "gold fell below rank N" choices
PAGE_ROWS = 20
MAX_ROWS = 100
DIRECTION_LABELS = {"text_to_image": "text→image", "image_to_text": "image→text"}


@dataclass
class Evaluated:
    """One version of the served index (and of the compared one): its outcomes, the caption features of its
    text→image queries (in `of("text_to_image")` order), the comparison (or why there is none), rendered plots."""
    key: tuple
    outcomes: PerQuery
    features: tuple[QueryFeatures, ...]
    comparison: Comparison | None = None
    compare_problem: str | None = None
    plots: dict[str, bytes] = field(default_factory=dict)


class EvalState:
    """The compared index (opened at start-up, so that a wrong path fails there) and the cache, behind one lock: two
    requests arriving together compute once."""

    def __init__(self, compare_path: Path | None):
        self.compare_path = compare_path
        self.other = open_index(compare_path) if compare_path is not None else None
        self.lock = threading.Lock()
        self.cached: dict[str, Evaluated] = {}  # per served index path: its latest version's

    def _other_version(self) -> tuple:
        """The compared index's version now on disk; re-opened when it changed (an `indexer update` of B)."""
        if self.other is None:
            return ()
        try:
            stat = (self.compare_path / MANIFEST_NAME).stat()
            if (stat.st_ino, stat.st_mtime_ns) != self.other.version:
                self.other = open_index(self.compare_path)
        except (EngineError, OSError) as exc:  # half swapped in, or gone: keep comparing with the version we have
            logging.getLogger(__name__).warning("keeping the compared index as it was: %s", exc)
        return self.other.version

    def evaluated(self, index: StoredIndex, compared: bool = True) -> Evaluated:
        """The per-query results of `index` (the served version), `compared` with the compared index if there is one;
        NoCaptionsError for an index without captions."""
        with self.lock:
            path = str(index.path)
            key = (path, index.version, self._other_version() if compared else None)
            if path not in self.cached or self.cached[path].key != key:
                self.cached.pop(path, None)  # free the old version's outcomes before computing the new ones
                self.cached[path] = self._compute(key, index, compared)
            return self.cached[path]

    def _compute(self, key: tuple, index: StoredIndex, compared: bool) -> Evaluated:
        outcomes = per_query(index)
        features = tuple(query_features(o.query) for o in outcomes.of("text_to_image"))
        evaluated = Evaluated(key, outcomes, features)
        if self.other is not None and compared:
            try:
                theirs = per_query(self.other)
                evaluated.comparison = compare(outcomes, theirs, TABLE_KS, labels=(index.path.name,
                                                                                   self.other.path.name))
            except (QueryError, NoCaptionsError) as exc:  # another dataset: say so on the page
                evaluated.compare_problem = str(exc)
        return evaluated


@eval_pages.record_once
def _open_compared(setup) -> None:
    config = setup.app.extensions[EXTENSION_KEY].config
    setup.app.extensions[STATE_KEY] = EvalState(config.compare_index)


def _state() -> EvalState:
    return current_app.extensions[STATE_KEY]


def _compared() -> bool:
    """Whether /eval compares: with `--compare-index`, on the default index."""
    return _state().compare_path is not None and engine().current() is engine().default


def _evaluated() -> Evaluated:
    return _state().evaluated(engine().searcher.index, _compared())


@eval_pages.get("/eval")
def page():
    index = engine().searcher.index
    manifest = index.manifest
    return render_template("eval.html", n_images=manifest.n_images, n_captions=manifest.n_captions,
                           model=str(manifest.encoder), compared=_compared(), kinds=KINDS,
                           direction_labels=DIRECTION_LABELS, lengths=[(k, LABELS[k]) for k in LENGTH_KEYS],
                           features=[(k, label, about) for k, label, about in WORD_GROUPS], fell=FELL,
                           languages=LANGUAGES,
                           page_rows=PAGE_ROWS,
                           ann_plot=url_for("plots.ann_plot") if has_ann_plot(manifest) else None,
                           training_plot=url_for("plots.training_plot") if training_record(manifest) else None)


def _recall_table(outcomes: PerQuery) -> dict:
    return {kind: {f"R@{k}": outcomes.recall(kind, k) for k in TABLE_KS} for kind in KINDS}


def _slices(evaluated: Evaluated) -> dict:
    """Recall@SLICE_K of text→image per caption group (length, word groups and, when the captions are in more than
    one language, each language: group `language_<code>`) against all captions."""
    hits = evaluated.outcomes.hit("text_to_image", SLICE_K)
    groups = []
    for key, label in GROUPS:
        chosen = [i for i, f in enumerate(evaluated.features) if key in f.all_groups]
        recall = 100 * int(hits[chosen].sum()) / len(chosen) if chosen else None
        groups.append({"group": key, "label": label, "n": len(chosen), "recall": recall})
    languages = [(code, label) for code, label in LANGUAGES if any(f.language == code for f in evaluated.features)]
    for code, label in languages if len(languages) > 1 else ():  # captions in several languages: one slice each
        chosen = [i for i, f in enumerate(evaluated.features) if f.language == code]
        groups.append({"group": f"language_{code}", "label": f"{label} captions", "n": len(chosen),
                       "recall": 100 * int(hits[chosen].sum()) / len(chosen)})
    return {"kind": "text_to_image", "k": SLICE_K, "all": 100 * int(hits.sum()) / len(hits), "n": len(hits),
            "groups": groups}


def _comparison_json(evaluated: Evaluated) -> dict | None:
    if evaluated.compare_problem is not None:
        return {"error": evaluated.compare_problem}
    comparison = evaluated.comparison
    if comparison is None:
        return None
    plots = {kind: {which: url_for("eval.compare_plot", kind=kind, which=which) for which in ("recall", "ranks")}
             for kind in KINDS}
    # the changed captions open on the search page (an image query has no URL there)
    changed = (*comparison.improved["text_to_image"], *comparison.worsened["text_to_image"])
    searches = {"text_to_image": {c.query_id: _search_url(c.query) for c in changed}}
    return {**comparison.to_json(), "plots": plots, "search": searches}


@eval_pages.get("/api/eval/summary")
def summary():
    evaluated = _evaluated()
    outcomes = evaluated.outcomes
    return jsonify(index=engine().current().name, ties=outcomes.ties,
                   n_queries={kind: len(outcomes.of(kind)) for kind in KINDS}, recall=_recall_table(outcomes),
                   slices=_slices(evaluated), compare=_comparison_json(evaluated),
                   plot=url_for("eval.recall_plot"))


def _search_url(caption: str) -> str:
    """The search page running this caption with the whole ranking (no relevance cutoff hiding the gold image)."""
    return url_for("pages.home", q=caption, cutoff="none")


def _int_choice(name: str, default: int, least: int = 0, most: int | None = None) -> int:
    raw = request.args.get(name, "")
    try:
        value = int(raw) if raw != "" else default
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if value < least or (most is not None and value > most):
        raise BadRequest(f"{name} must be between {least} and {most}" if most is not None
                         else f"{name} must be at least {least}")
    return value


def _choice(name: str, allowed: tuple[str, ...], default: str = "") -> str:
    value = request.args.get(name, default) or default
    if value and value not in allowed:
        raise BadRequest(f"unknown {name} '{value}' (use {', '.join(allowed)})")
    return value


def _item(kind: str, outcomes: PerQuery, item_id: int, score: float | None = None) -> dict:
    """A candidate of a `kind` query: an image (with its thumbnail) or a caption."""
    item = {"id": item_id, **outcomes.item_name(kind, item_id)}
    if kind == "text_to_image":
        item["thumbnail"] = url_for("pages.thumbnail", image_id=item_id)
    if score is not None:
        item["score"] = score
    return item


def _row(outcomes: PerQuery, outcome: QueryOutcome, features: QueryFeatures | None) -> dict:
    kind = outcome.kind
    row = {"kind": kind, "query_id": outcome.query_id, "query": outcome.query, "rank": outcome.rank,
           "score": outcome.score, "gold": [_item(kind, outcomes, g) for g in outcome.gold],
           "beaten_by": [_item(kind, outcomes, i, s) for i, s in outcome.beaten_by]}
    if features is not None:
        row.update(groups=list(features.all_groups), search=_search_url(outcome.query))
    else:  # an image query: its own picture
        row.update(thumbnail=url_for("pages.thumbnail", image_id=outcome.query_id),
                   url=url_for("pages.original", image_id=outcome.query_id))
    return row


@eval_pages.get("/api/eval")
def failures():
    """The outcomes of one direction, worst first (highest rank, then query id), filtered and paged."""
    kind = _choice("kind", KINDS, "text_to_image")
    length, feature = _choice("length", LENGTH_KEYS), _choice("feature", WORD_KEYS)
    language = _choice("language", tuple(code for code, _ in LANGUAGES))
    fell = _int_choice("fell", 0)
    offset, limit = _int_choice("offset", 0), _int_choice("limit", PAGE_ROWS, 1, MAX_ROWS)
    if kind != "text_to_image" and (length or feature or language):
        raise BadRequest("length, feature and language describe captions: they filter text_to_image queries only")
    evaluated = _evaluated()
    outcomes = evaluated.outcomes
    rows = list(zip(outcomes.of(kind), evaluated.features if kind == "text_to_image" else [None] * len(
        outcomes.of(kind))))
    kept = [(o, f) for o, f in rows if o.rank > fell and (not length or f.length == length)
            and (not feature or feature in f.groups) and (not language or f.language == language)]
    kept.sort(key=lambda pair: (-pair[0].rank, pair[0].query_id))
    return jsonify(kind=kind, total=len(kept), offset=offset, limit=limit,
                   rows=[_row(outcomes, o, f) for o, f in kept[offset:offset + limit]])


def _png(evaluated: Evaluated, name: str, make) -> object:
    with _state().lock:  # matplotlib figures are per call, but render each plot once per version
        if name not in evaluated.plots:
            from search import plots  # matplotlib only for the plots

            evaluated.plots[name] = plots.to_png_bytes(make(plots))
        data = evaluated.plots[name]
    response = send_file(io.BytesIO(data), mimetype="image/png", max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # a new index version draws another curve
    return response


def _evaluated_or_404() -> Evaluated:
    try:
        return _evaluated()
    except NoCaptionsError as exc:
        abort(404, str(exc))


@eval_pages.get("/eval/plot/recall.png")
def recall_plot():
    evaluated = _evaluated_or_404()
    outcomes = evaluated.outcomes
    series = {DIRECTION_LABELS[kind]: {k: outcomes.recall(kind, k) for k in range(1, CURVE_MAX_K + 1)}
              for kind in KINDS}
    return _png(evaluated, "recall", lambda plots: plots.recall_curves(series, f"recall@k · {outcomes.ties} ties"))


@eval_pages.get("/eval/plot/compare/<kind>/<which>.png")
def compare_plot(kind: str, which: str):
    evaluated = _evaluated_or_404()
    comparison = evaluated.comparison
    if comparison is None or kind not in KINDS or which not in ("recall", "ranks"):
        abort(404)
    label = DIRECTION_LABELS[kind]
    if which == "recall":
        return _png(evaluated, f"{which}/{kind}",
                    lambda plots: plots.recall_curves(comparison.curves[kind], f"{label} recall@k"))
    return _png(evaluated, f"{which}/{kind}", lambda plots: plots.rank_scatter(
        *comparison.ranks[kind], comparison.labels, f"{label}: rank of the correct item"))
