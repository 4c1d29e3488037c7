"""Plots of the index in use and of the model behind it, as images where people look (the footer, /eval).

GET /plot/ann.png        recall@10 of each approximate FAISS index against exact search, per build and update since it
                         was trained, against the share of vectors added since (manifest.indexes[kind]["recall_history"])
GET /plot/training.png   recall per epoch of the fine-tune that made the model (its folder's training.json, when the
                         index was built with a local-dir model that has one); 404 otherwise
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from flask import Blueprint, abort, send_file

from search.encoders import LOCAL_DIR_PREFIX
from search.index_choice import ann_stats
from search.manifest import Manifest
from search.openclip import RUN_FILE

from .engine import engine

plot_pages = Blueprint("plots", __name__)


def training_record(manifest: Manifest) -> dict | None:
    """The training.json of the model the index was built with, when it is a fine-tuned local-dir folder."""
    model = manifest.encoder.model
    if not model.startswith(LOCAL_DIR_PREFIX):
        return None
    try:
        run = json.loads((Path(model[len(LOCAL_DIR_PREFIX):]) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("history") else None


def ann_history(manifest: Manifest, directory: Path) -> dict[str, list]:
    """Per approximate index kind, its [share added, recall@10] measurements (empty for exact indexes)."""
    return {kind: [tuple(p) for p in stats["recall_history"]]
            for kind, stats in ann_stats(manifest, directory).items() if stats["recall_history"]}


def _png(figure) -> object:
    from search import plots  # matplotlib only when a plot is drawn

    response = send_file(io.BytesIO(plots.to_png_bytes(figure)), mimetype="image/png", max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # the next index version draws another
    return response


@plot_pages.get("/plot/ann.png")
def ann_plot():
    index = engine().searcher.index
    history = ann_history(index.manifest, index.path)
    if not history:
        abort(404, "this index searches exactly (Flat): there is no approximate recall to plot")
    from search import plots

    targets = [e.get("target_recall") for e in index.manifest.indexes.values() if e.get("target_recall")]
    return _png(plots.ann_recall(history, targets[0] if targets else None))


@plot_pages.get("/plot/training.png")
def training_plot():
    run = training_record(engine().searcher.index.manifest)
    if run is None:
        abort(404, "the index's model has no training record (it was not fine-tuned here)")
    from search import plots

    figure = plots.training_curve(run)
    if figure is None:
        abort(404, "the model's training record holds no recall per epoch")
    return _png(figure)
