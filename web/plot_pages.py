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


def has_ann_plot(manifest: Manifest) -> bool:
    """Whether an index version has approximate indexes with recall measurements to plot."""
    return any(entry.get("recall_history") for entry in manifest.indexes.values())


def _png(figure) -> object:
    from search import plots  # matplotlib only when a plot is drawn

    response = send_file(io.BytesIO(plots.to_png_bytes(figure)), mimetype="image/png", max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # the next index version draws another
    return response


@plot_pages.get("/plot/ann.png")
def ann_plot():
    from search import plots

    figure = plots.ann_recall_of(engine().searcher.index.manifest.indexes)
    if figure is None:
        abort(404, "this index searches exactly (Flat): there is no approximate recall to plot")
    return _png(figure)


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
