"""Plots people look at rather than read: recall@k curves, a rank scatter of two models, recall per fine-tuning epoch
and the ANN recall of an index, as matplotlib Figures written to PNG or SVG.

Figures are built with matplotlib.figure.Figure and rendered by the Agg canvas directly: no pyplot, so no global
figure registry, no GUI backend and nothing left open between calls (safe in web server threads). matplotlib is
imported with this module only: the query paths of the search package never import it.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import QueryError

FORMATS = (".png", ".svg")
SIZE = (6.4, 4.2)  # inches
DPI = 100
DIRECTION_LABELS = {"text_to_image": "text→image", "image_to_text": "image→text"}
EPOCH_KS = (1, 5, 10)  # an epoch's recall: the mean of R@1/5/10 over both directions (what the fine-tune keeps best)


def _figure(title: str, xlabel: str, ylabel: str):
    figure = Figure(figsize=SIZE, dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def recall_curves(series: Mapping[str, Mapping[int, float]], title: str = "recall@k") -> Figure:
    """One line per label: recall (percent) against k (log scale when k spans more than 1..10)."""
    figure, axes = _figure(title, "k", "recall@k (%)")
    for label, curve in series.items():
        ks = sorted(curve)
        axes.plot(ks, [curve[k] for k in ks], marker="." if len(ks) <= 60 else None, label=label)
    if any(max(curve, default=0) > 10 for curve in series.values()):
        axes.set_xscale("log")
    axes.set_ylim(0, 100)
    if series:
        axes.legend(loc="lower right")
    return figure


def rank_scatter(a_ranks: Sequence[int], b_ranks: Sequence[int], labels: Sequence[str] = ("A", "B"),
                 title: str = "rank of the correct item per query") -> Figure:
    """Each query's rank under A (x) against B (y), log scales; below the diagonal B ranks it better."""
    a, b = np.asarray(a_ranks, float), np.asarray(b_ranks, float)
    if a.shape != b.shape:
        raise QueryError(f"rank_scatter needs as many ranks for {labels[0]} as for {labels[1]}")
    figure, axes = _figure(title, f"rank under {labels[0]}", f"rank under {labels[1]}")
    # jitter-free, but translucent: many queries share ranks 1, 2, ...
    axes.scatter(a, b, s=8, alpha=0.35, linewidths=0)
    top = max(float(a.max(initial=1)), float(b.max(initial=1)), 2.0)
    axes.plot([1, top], [1, top], color="grey", linewidth=1, linestyle="--")
    axes.set_xscale("log")
    axes.set_yscale("log")
    better, worse = int(np.sum(b < a)), int(np.sum(b > a))
    axes.text(0.02, 0.98, f"better under {labels[1]}: {better}\nworse under {labels[1]}: {worse}",
              transform=axes.transAxes, va="top", fontsize=9)
    return figure


def _mean_recall(recall: Mapping | None) -> float:
    """Mean of R@1/5/10 over both directions of a training.json 'val'-shaped dict; NaN when absent."""
    if not recall:
        return math.nan
    try:
        return float(np.mean([recall[d][f"R@{k}"] for d in DIRECTION_LABELS for k in EPOCH_KS]))
    except (KeyError, TypeError):
        return math.nan


def epoch_curve(records: Sequence[Mapping], baseline: Mapping | None = None,
                title: str = "recall per epoch") -> Figure:
    """training.json's history records: the mean of R@1/5/10 (both directions) of "val" per epoch, and of "guard"
    when the records have it; `baseline` (a 'val'-shaped dict: the guard set's recall before training) as a
    horizontal line."""
    figure, axes = _figure(title, "epoch", "mean recall@1/5/10 (%)")
    epochs = [record.get("epoch", i + 1) for i, record in enumerate(records)]
    for key, label in (("val", "validation"), ("guard", "guard set")):
        values = [_mean_recall(record.get(key)) for record in records]
        if any(not math.isnan(v) for v in values):
            axes.plot(epochs, values, marker="o", label=label)
    if baseline is not None and not math.isnan(_mean_recall(baseline)):
        axes.axhline(_mean_recall(baseline), color="grey", linestyle="--", label="guard set before training")
    if epochs:
        axes.set_xticks(sorted(set(epochs)))
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best")
    return figure


def training_curve(run: Mapping) -> Figure | None:
    """The epoch curve of a training.json record (indexer finetune): its baseline (recall before training, shown as
    epoch 0) and history; None when no epoch measured any recall."""
    records = ([run["baseline"]] if run.get("baseline") else []) + list(run.get("history", []))
    if not any("val" in r or "guard" in r for r in records):
        return None
    return epoch_curve(records, (run.get("baseline") or {}).get("guard"))


def ann_recall(points: Mapping[str, Sequence[tuple[float, float]]], target: float | None = None,
               title: str = "ANN recall@10 against exact search") -> Figure:
    """Per index kind ('images', 'captions'): (share of vectors added since the index was trained, 0–1; recall@10,
    0–1) measurements in time order; `target` (0–1) as a horizontal line."""
    figure, axes = _figure(title, "vectors added since training (%)", "recall@10 (%)")
    for kind, kind_points in points.items():
        if kind_points:
            shares, recalls = zip(*kind_points)
            axes.plot([100 * s for s in shares], [100 * r for r in recalls], marker="o", label=kind)
    if target is not None:
        axes.axhline(100 * target, color="grey", linestyle="--", label="target")
    axes.set_ylim(0, 101)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower left")
    return figure


def recall_history(indexes: Mapping[str, Mapping]) -> dict[str, list[tuple[float, float]]]:
    """Per approximate index kind of a manifest's `indexes`, its (share added since training, recall@10) points,
    as indexer/ann_recall.py records them at every build and update; exact indexes have none."""
    return {kind: [tuple(point) for point in entry["recall_history"]]
            for kind, entry in indexes.items() if entry.get("recall_history")}


def ann_recall_of(indexes: Mapping[str, Mapping]) -> Figure | None:
    """`ann_recall` of a manifest's `indexes` (its target from them); None when every index is exact."""
    history = recall_history(indexes)
    if not history:
        return None
    targets = [entry["target_recall"] for entry in indexes.values() if entry.get("target_recall")]
    return ann_recall(history, targets[0] if targets else None)


def save(figure: Figure, path: Path | str) -> Path:
    """Write the figure as PNG or SVG, by the path's suffix; QueryError for another suffix."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise QueryError(f"cannot write a plot as '{path.suffix}' ({path.name}): use {' or '.join(FORMATS)}")
    figure.savefig(path, format=path.suffix.lower()[1:], dpi=DPI)
    return path


def to_png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
