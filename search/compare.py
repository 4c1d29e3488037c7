"""Comparing two indexes of the same dataset (another model, precision, fine-tune or index type) with confidence:
recall@k of both, the difference B − A with a 95 % paired-bootstrap interval over queries, and the queries whose rank
changed most (`search compare`, the /eval page of two indexes served together).

The bootstrap resamples queries with replacement (numpy, seeded: the same numbers on every run), the same resample
for A and B (paired), and takes the 2.5th and 97.5th percentiles of the resampled differences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import QueryError
from .per_query import CURVE_MAX_K, KINDS, PerQuery, QueryOutcome

KS = (1, 5, 10)
N_BOOT = 1000
CONFIDENCE = 0.95
N_CHANGES = 10  # queries listed per direction and way (improved, worsened)
_BOOT_CHUNK = 1 << 22  # resampled query indexes drawn at once (32 MB of int64)
LABELS = {"text_to_image": "text→image", "image_to_text": "image→text"}


@dataclass(frozen=True)
class Difference:
    """Recall@k (percent) of A and B in one direction, B − A and its confidence interval (percentage points)."""
    kind: str
    k: int
    a: float
    b: float
    difference: float
    low: float
    high: float

    def to_json(self) -> dict:
        return {"kind": self.kind, "k": self.k, "a": self.a, "b": self.b, "difference": self.difference,
                "ci_low": self.low, "ci_high": self.high}


@dataclass(frozen=True)
class Change:
    """A query whose rank changed: `query` (caption text or image path), `gold` ids and the ranks under A and B."""
    kind: str
    query_id: int
    query: str
    gold: tuple[int, ...]
    rank_a: int
    rank_b: int

    def to_json(self) -> dict:
        return {"kind": self.kind, "query_id": self.query_id, "query": self.query, "gold": list(self.gold),
                "rank_a": self.rank_a, "rank_b": self.rank_b}


@dataclass(frozen=True)
class Comparison:
    """What `compare` found. `improved` / `worsened`: per direction, the queries whose rank changed most (by the
    ratio of the ranks, so 20 → 1 outranks 3000 → 2000), most first. `curves` (per direction and label: recall@k for
    k = 1..CURVE_MAX_K) and `ranks` (per direction: A's and B's ranks, query by query) feed the plots."""
    labels: tuple[str, str]
    ks: tuple[int, ...]
    n_boot: int
    seed: int
    n_queries: Mapping[str, int]
    differences: tuple[Difference, ...]
    improved: Mapping[str, tuple[Change, ...]]
    worsened: Mapping[str, tuple[Change, ...]]
    curves: Mapping[str, Mapping[str, Mapping[int, float]]] = field(default_factory=dict, repr=False)
    ranks: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def difference(self, kind: str, k: int) -> Difference:
        return next(d for d in self.differences if d.kind == kind and d.k == k)

    def to_json(self) -> dict:
        """`search compare --json`'s shape."""
        return {"a": self.labels[0], "b": self.labels[1], "confidence": CONFIDENCE, "n_boot": self.n_boot,
                "seed": self.seed,
                **{kind: {"n_queries": self.n_queries[kind],
                          "recall": [d.to_json() for d in self.differences if d.kind == kind],
                          "improved": [c.to_json() for c in self.improved[kind]],
                          "worsened": [c.to_json() for c in self.worsened[kind]]} for kind in KINDS}}

    def format(self) -> str:
        """The report a person reads."""
        named = [label if label[:3] in ("A: ", "B: ") else f"{side}: {label}" for side, label in zip("AB", self.labels)]
        lines = [*named,
                 f"B − A with a {CONFIDENCE:.0%} paired-bootstrap interval ({self.n_boot} resamples of the queries, "
                 f"seed {self.seed})", f"{'':14}{'':6}{'A':>8}{'B':>8}{'B − A':>9}  interval"]
        for d in self.differences:
            lines.append(f"{LABELS[d.kind]:14}{'R@' + str(d.k):6}{d.a:8.2f}{d.b:8.2f}{d.difference:+9.2f}  "
                         f"[{d.low:+.2f}, {d.high:+.2f}]{'' if d.low <= 0 <= d.high else '  *'}")
        lines.append("(* the interval excludes 0)")
        for kind in KINDS:
            for title, changes in (("improved most", self.improved[kind]), ("worsened most", self.worsened[kind])):
                if changes:
                    lines.append(f"{LABELS[kind]}, {title} under B (rank A → B):")
                    lines += [f"  {c.rank_a:>6} → {c.rank_b:<6} {c.query}" for c in changes]
        return "\n".join(lines)

    def write_plots(self, directory: Path | str, suffix: str = ".png") -> list[Path]:
        """recall_<direction>.<suffix> (recall@k curves of A and B) and ranks_<direction>.<suffix> (rank scatter)
        in `directory` (created); the paths written. Imports matplotlib (search.plots) only here."""
        from . import plots

        directory = Path(directory)
        if suffix not in plots.FORMATS:
            raise QueryError(f"plots are written as {' or '.join(plots.FORMATS)}, not '{suffix}'")
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for kind in KINDS:
            figure = plots.recall_curves(self.curves[kind], f"{LABELS[kind]} recall@k")
            written.append(plots.save(figure, directory / f"recall_{kind}{suffix}"))
            figure = plots.rank_scatter(*self.ranks[kind], self.labels, f"{LABELS[kind]}: rank of the correct item")
            written.append(plots.save(figure, directory / f"ranks_{kind}{suffix}"))
        return written


def _identity(outcomes: tuple[QueryOutcome, ...]) -> list[tuple]:
    return [(o.kind, o.query_id, o.query, o.gold) for o in outcomes]


def check_same_dataset(a: PerQuery, b: PerQuery) -> None:
    """QueryError unless A and B hold the same queries (captions, image paths, which caption belongs to which image)
    and were ranked with the same tie rule."""
    if a.ties != b.ties:
        raise QueryError(f"the two results use different tie rules ({a.ties}, {b.ties})")
    ours, theirs = _identity(a.outcomes), _identity(b.outcomes)
    if ours != theirs:
        where = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        detail = (f"{len(ours)} against {len(theirs)} queries" if where == min(len(ours), len(theirs))
                  else f"query {where}: {ours[where][2]!r} against {theirs[where][2]!r}")
        raise QueryError(f"the indexes hold different datasets ({detail}); compare indexes of the same data")


def bootstrap_interval(a_hits: np.ndarray, b_hits: np.ndarray, n_boot: int = N_BOOT, seed: int = 0
                       ) -> np.ndarray:
    """[len(ks), 2]: the 95 % percentile interval of mean(b − a) * 100 over `n_boot` resamples of the rows (queries)
    of the [queries, len(ks)] hit tables, paired (the same rows for A and B)."""
    difference = b_hits.astype(np.int64) - a_hits.astype(np.int64)
    n = len(difference)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, difference.shape[1]))
    chunk = max(1, _BOOT_CHUNK // max(n, 1))
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        rows = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = difference[rows].sum(axis=1) / n
    tail = (1 - CONFIDENCE) / 2
    return 100 * np.quantile(means, [tail, 1 - tail], axis=0).T


def _changes(a: tuple[QueryOutcome, ...], a_ranks: np.ndarray, b_ranks: np.ndarray, n: int
             ) -> tuple[tuple[Change, ...], tuple[Change, ...]]:
    """The n queries most improved and most worsened under B, by |log(rank B / rank A)|, then the rank difference,
    then query order."""
    ratio = np.log(b_ranks) - np.log(a_ranks)
    spread = b_ranks - a_ranks
    order = np.lexsort((np.arange(len(a)), -np.abs(spread), -np.abs(ratio)))

    def pick(sign: int) -> tuple[Change, ...]:
        chosen = [i for i in order if np.sign(spread[i]) == sign][:n]
        return tuple(Change(a[i].kind, a[i].query_id, a[i].query, a[i].gold, int(a_ranks[i]), int(b_ranks[i]))
                     for i in chosen)
    return pick(-1), pick(1)


def compare(a: PerQuery, b: PerQuery, ks: tuple[int, ...] = KS, n_boot: int = N_BOOT, seed: int = 0,
            labels: tuple[str, str] | None = None, n_changes: int = N_CHANGES) -> Comparison:
    """Compare B against A, query by query (both from search.per_query on the same dataset, else QueryError)."""
    check_same_dataset(a, b)
    if n_boot < 1 or n_changes < 0 or not ks or min(ks) < 1:
        raise QueryError("compare needs at least one resample, k values of at least 1 and a count of changed "
                         "queries of at least 0")
    labels = labels or (a.name or "A", b.name or "B")
    if labels[0] == labels[1]:  # an index against itself: the curves need two names
        labels = (f"A: {labels[0]}", f"B: {labels[1]}")
    differences, improved, worsened, curves, ranks, counts = [], {}, {}, {}, {}, {}
    for number, kind in enumerate(KINDS):
        outcomes = a.of(kind)
        counts[kind] = len(outcomes)
        if not outcomes:
            raise QueryError(f"no {LABELS[kind]} queries to compare")
        a_hits = np.stack([a.hit(kind, k) for k in ks], axis=1)
        b_hits = np.stack([b.hit(kind, k) for k in ks], axis=1)
        # one generator per direction, so that either direction's interval does not depend on the other
        interval = bootstrap_interval(a_hits, b_hits, n_boot, seed * len(KINDS) + number)
        for j, k in enumerate(ks):
            recall_a, recall_b = a.recall(kind, k), b.recall(kind, k)
            differences.append(Difference(kind, k, recall_a, recall_b, recall_b - recall_a,
                                          _clean(interval[j, 0]), _clean(interval[j, 1])))
        ranks[kind] = a.ranks(kind), b.ranks(kind)
        improved[kind], worsened[kind] = _changes(outcomes, *ranks[kind], n_changes)
        curves[kind] = {label: {k: side.recall(kind, k) for k in range(1, CURVE_MAX_K + 1)}
                        for label, side in zip(labels, (a, b))}
    return Comparison(tuple(labels), tuple(ks), n_boot, seed, counts, tuple(differences), improved, worsened,
                      curves, ranks)


def _clean(value: float) -> float:
    """A percentile as a plain float, -0.0 as 0.0 (an interval of a self-comparison reads [0, 0])."""
    value = float(value)
    return 0.0 if value == 0 or math.isclose(value, 0, abs_tol=1e-12) else value
