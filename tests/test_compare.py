"""search/compare.py, search/plots.py and `search compare`: a self-comparison differs by 0 with the interval [0, 0];
the trained tiny model beats a random one of the same shape on the pairs it learned, with an interval above 0."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search import plots
from search.compare import bootstrap_interval, compare
from search.errors import QueryError
from search.per_query import KINDS, outcomes_of, per_query
from search.store import open_index

from .helpers import build_test_index, make_pairs

ROOT = Path(__file__).resolve().parents[1]
N_PAIRS = 50  # the pairs `trained_model_dir` memorised (make_pairs(50, seed=1))


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, trained_model_dir, tiny_model_dir):
    """The same 50 captioned images indexed by the trained tiny model and by the random one it started from."""
    root = tmp_path_factory.mktemp("compare")
    pairs = make_pairs(N_PAIRS, seed=1)
    for name, model in (("trained", trained_model_dir), ("random", tiny_model_dir)):
        build_test_index(root, pairs, f"local-dir:{model}", name=name)
    return root


def run(cwd, *args):
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_an_index_against_itself_differs_by_nothing(indexes):
    side = per_query(open_index(indexes / "trained"))
    comparison = compare(side, side)
    assert len(comparison.differences) == 6
    for d in comparison.differences:
        assert d.a == d.b == side.recall(d.kind, d.k) and (d.difference, d.low, d.high) == (0.0, 0.0, 0.0)
    assert all(not comparison.improved[kind] and not comparison.worsened[kind] for kind in KINDS)
    assert "[+0.00, +0.00]" in comparison.format() and "  *" not in comparison.format().splitlines()[4]


def test_trained_model_beats_a_random_one_with_confidence(indexes, tmp_path):
    # as a user runs it: from another directory, relative paths, both kinds of plots
    done = run(indexes, "compare", "--index", "random", "--index", "trained", "--json", "--plots", str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["a"], result["b"], result["n_boot"], result["confidence"]) == ("random", "trained", 1000, 0.95)
    random_side, trained = (per_query(open_index(indexes / name)) for name in ("random", "trained"))
    for kind in KINDS:
        assert result[kind]["n_queries"] == (3 * N_PAIRS if kind == "text_to_image" else N_PAIRS)
        for row in result[kind]["recall"]:
            assert (row["a"], row["b"]) == (random_side.recall(kind, row["k"]), trained.recall(kind, row["k"]))
            assert row["difference"] == pytest.approx(row["b"] - row["a"])
            assert row["ci_low"] <= row["difference"] <= row["ci_high"]
            # the trained model memorised these pairs (R@1 31 % / 82 %), a random one ranks near chance (1 % / 2 %)
            assert row["difference"] > 0 and row["ci_low"] > 0, (kind, row)
        for way, better in (("improved", True), ("worsened", False)):
            for change in result[kind][way]:
                assert (change["rank_b"] < change["rank_a"]) == better
                outcome = next(o for o in trained.of(kind) if o.query_id == change["query_id"])
                assert (outcome.rank, outcome.query, tuple(outcome.gold)) == \
                    (change["rank_b"], change["query"], tuple(change["gold"]))
        assert result[kind]["improved"], kind
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert written == sorted(f"{what}_{kind}.png" for what in ("recall", "ranks") for kind in KINDS)
    for path in (tmp_path / "p").iterdir():
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 100
    text = run(indexes, "compare", "--index", "random", "--index", "trained", "--plots", "svg",
               "--plot-format", "svg")
    assert text.returncode == 0, text.stderr
    assert "B − A" in text.stdout and "improved most" in text.stdout
    assert (indexes / "svg" / "recall_text_to_image.svg").read_text().lstrip().startswith("<?xml")


def test_the_interval_matches_a_plain_bootstrap():
    rng = np.random.default_rng(1)
    a, b = rng.random((200, 2)) < 0.4, rng.random((200, 2)) < 0.5
    interval = bootstrap_interval(a, b, n_boot=400, seed=7)
    generator = np.random.default_rng(7)  # the same draws, one resample at a time
    diffs = [(b[rows].mean(axis=0) - a[rows].mean(axis=0)) for rows in
             (generator.integers(0, 200, 200) for _ in range(400))]
    assert interval == pytest.approx(100 * np.percentile(diffs, [2.5, 97.5], axis=0).T)
    assert np.array_equal(interval, bootstrap_interval(a, b, n_boot=400, seed=7))  # seeded: the same every run


def test_different_datasets_are_refused(tmp_path):
    images = np.eye(4, dtype=np.float32)
    texts, paths = [f"c{i}" for i in range(4)], [f"i{i}.png" for i in range(4)]
    side = outcomes_of(images, images, [0, 1, 2, 3], texts, paths)
    for other in (outcomes_of(images, images, [0, 1, 2, 3], texts[:3] + ["other"], paths),
                  outcomes_of(images[:3], images[:3], [0, 1, 2], texts[:3], paths[:3]),
                  outcomes_of(images, images, [1, 0, 2, 3], texts, paths),
                  outcomes_of(images, images, [0, 1, 2, 3], texts, paths, ties="strict")):
        with pytest.raises(QueryError):
            compare(side, other)


def test_compare_cli_bad_input_is_one_line(indexes, tmp_path):
    (tmp_path / "blocker").write_text("a file where the plot folder should go")
    for args, message in ((["--index", "trained"], "twice"),
                          (["--index", "trained", "--index", "nowhere"], "nowhere"),
                          (["--index", "trained", "--index", "random", "--plots", str(tmp_path / "blocker")],
                           "cannot write plots")):
        done = run(indexes, "compare", *args)
        assert done.returncode == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1


def test_plots_render_without_pyplot(tmp_path):
    figures = [plots.recall_curves({"A": {1: 10.0, 5: 30.0, 50: 90.0}, "B": {1: 20.0, 5: 40.0, 50: 95.0}}),
               plots.rank_scatter([1, 5, 30], [2, 1, 3], ("A", "B")),
               plots.epoch_curve([{"epoch": 1, "val": {d: {"R@1": 10, "R@5": 30, "R@10": 40} for d in KINDS},
                                   "guard": {d: {"R@1": 50, "R@5": 70, "R@10": 80} for d in KINDS}},
                                  {"epoch": 2, "val": {d: {"R@1": 20, "R@5": 40, "R@10": 50} for d in KINDS}}],
                                 baseline={d: {"R@1": 52, "R@5": 72, "R@10": 82} for d in KINDS}),
               plots.ann_recall({"images": [(0.0, 0.99), (0.3, 0.93)], "captions": [(0.0, 0.97)]}, target=0.95)]
    for number, figure in enumerate(figures):
        with Image.open(plots.save(figure, tmp_path / f"{number}.png")) as image:
            assert image.format == "PNG"
        assert plots.to_png_bytes(figure).startswith(b"\x89PNG")
    assert "<svg" in plots.save(figures[0], tmp_path / "curve.svg").read_text()
    with pytest.raises(QueryError, match="png or .svg"):
        plots.save(figures[0], tmp_path / "curve.jpg")


def test_search_package_imports_matplotlib_only_for_plots_and_never_pyplot():
    code = ("import sys, search.cli, search.per_query, search.compare, search.evaluation\n"
            "print('matplotlib' in sys.modules)\n"
            "from search import plots\n"
            "plots.to_png_bytes(plots.rank_scatter([1, 2], [2, 1]))\n"
            "print('matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["False", "False"], done.stderr
