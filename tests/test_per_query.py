"""search/per_query.py and `search eval --per-query / --format clip_benchmark`: per-query ranks against a numpy brute
force, recall from them against `search eval`, the CLIP_benchmark JSON against clip-benchmark's own code."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import search.metrics as metrics_module
from search.cli import main as search_main
from search.encoders import EncoderSpec
from search.evaluation import clip_benchmark_result
from search.metrics import retrieval_metrics
from search.per_query import BEATEN_MAX, CURVE_MAX_K, KINDS, outcomes_of

from .helpers import build_test_index, make_pairs
from .test_metrics import tied_vectors

ROOT = Path(__file__).resolve().parents[1]


def names(images, captions):
    return [f"caption {i}" for i in range(len(captions))], [f"img_{i}.png" for i in range(len(images))]


def brute_force(images, captions, caption_image_ids, ties):
    """{(kind, query id): (rank, gold score, beaten_by)} by sorting every candidate of every query with numpy: by
    score, then (strict) wrong before correct, then id. Scores: CLIP_benchmark's single torch product."""
    scores = (torch.from_numpy(captions) @ torch.from_numpy(images).T).numpy()
    ids = np.asarray(caption_image_ids)
    result = {}
    for kind, matrix in (("text_to_image", scores), ("image_to_text", scores.T)):
        for query, row in enumerate(matrix):
            own = (np.arange(len(row)) == ids[query]) if kind == "text_to_image" else (ids == query)
            if not own.any():
                continue
            tie = own.astype(int) if ties == "strict" else np.zeros(len(row), int)
            order = np.lexsort((np.arange(len(row)), tie, -row))
            first = int(np.flatnonzero(own[order])[0])
            beaten = tuple((int(c), float(row[c])) for c in order[:min(first, BEATEN_MAX)])
            result[kind, query] = (first + 1, float(row[own].max()), beaten)
    return result


@pytest.mark.parametrize("ties", ["clip_benchmark", "position", "strict"])
def test_ranks_scores_and_beaten_by_equal_a_numpy_brute_force(ties):
    images, captions, ids = tied_vectors(60, seed=5)
    outcomes = outcomes_of(images, captions, ids, *names(images, captions), ties=ties)
    # ranks under clip_benchmark are metrics' ranks: by position among equal scores
    expected = brute_force(images, captions, ids, "strict" if ties == "strict" else "position")
    assert len(outcomes.outcomes) == len(expected) == 300 + 60
    for o in outcomes.outcomes:
        assert (o.rank, o.score, o.beaten_by) == expected[o.kind, o.query_id], (o.kind, o.query_id)
        assert o.gold == ((int(ids[o.query_id]),) if o.kind == "text_to_image"
                          else tuple(np.flatnonzero(ids == o.query_id)))
    # the ties decide some ranks, or the rule would be untested
    if ties == "strict":
        position = outcomes_of(images, captions, ids, *names(images, captions), ties="position")
        assert any((position.ranks(kind) < outcomes.ranks(kind)).any() for kind in KINDS)


def test_images_without_captions_are_no_queries():
    images, captions = np.eye(3, dtype=np.float32), np.array([[1, 0, 0], [0, 0.6, 0.8]], np.float32)
    outcomes = outcomes_of(images, captions, [0, 1], *names(images, captions))
    assert [o.query_id for o in outcomes.of("image_to_text")] == [0, 1]
    caption_1 = outcomes.of("text_to_image")[1]  # image 2 beats image 1 for caption 1
    assert (caption_1.rank, caption_1.beaten_by) == (2, ((2, pytest.approx(0.8)),))
    line = json.loads(list(outcomes.to_jsonl())[1])
    assert line == {"kind": "text_to_image", "query_id": 1, "query": "caption 1", "gold": [1], "rank": 2,
                    "score": pytest.approx(0.6), "beaten_by": [{"id": 2, "score": pytest.approx(0.8),
                                                                "image": "img_2.png"}]}


@pytest.mark.parametrize("n_images", [700, 40])  # torch.topk's heap / nth_element (see test_metrics)
@pytest.mark.parametrize("block_scores", [None, 3000])
def test_recall_from_per_query_results_is_search_evals(n_images, block_scores, monkeypatch):
    if block_scores:
        monkeypatch.setattr(metrics_module, "_BLOCK_SCORES", block_scores)
    images, captions, ids = tied_vectors(n_images, seed=n_images)
    ks = (1, 2, 5, 10, 20, 50, 60)
    for ties in ("clip_benchmark", "position", "strict"):
        outcomes = outcomes_of(images, captions, ids, *names(images, captions), ties=ties)
        expected = retrieval_metrics(images, captions, ids, ks=ks, ties=ties).to_json()
        # beyond the counted hits (k > CURVE_MAX_K) recall comes from the ranks: the position rule among equal scores
        beyond = retrieval_metrics(images, captions, ids, ks=ks, ties="strict" if ties == "strict" else "position")
        for kind in KINDS:
            assert {k: outcomes.recall(kind, k) for k in ks} == \
                {k: (expected if k <= CURVE_MAX_K else beyond.to_json())[kind][f"R@{k}"] for k in ks}
            assert round(float(outcomes.ranks(kind).mean()), 4) == expected[kind]["mean_rank"]
            assert float(np.median(outcomes.ranks(kind))) == expected[kind]["median_rank"]


def clip_benchmark_metrics(image_vectors, caption_vectors, caption_image_ids) -> dict:
    """CLIP_benchmark's `metrics`, computed by its own functions exactly as its zeroshot_retrieval.evaluate does."""
    try:
        from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("clip-benchmark is not installed; install.sh installs it")
        pytest.skip("clip-benchmark not installed (bash install.sh)")
    scores = torch.from_numpy(np.asarray(caption_vectors)) @ torch.from_numpy(np.asarray(image_vectors)).t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), torch.as_tensor(np.asarray(caption_image_ids))] = True
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"image_retrieval_recall@{k}"] = \
            (batchify(recall_at_k, scores, positive_pairs, 64, "cpu", k=k) > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = \
            (batchify(recall_at_k, scores.T, positive_pairs.T, 64, "cpu", k=k) > 0).float().mean().item()
    return metrics


@pytest.mark.parametrize("n_images", [700, 40])
def test_clip_benchmark_result_equals_clip_benchmarks_own_numbers(n_images):
    images, captions, ids = tied_vectors(n_images, seed=n_images)
    outcomes = outcomes_of(images, captions, ids, *names(images, captions))
    index = SimpleNamespace(path=Path("ix"), manifest=SimpleNamespace(
        encoder=EncoderSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k"),
        source={"annotations": "/data/dataset_flickr30k.json"}))
    result = clip_benchmark_result(index, outcomes)
    assert result == {"dataset": "flickr30k", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
                      "task": "zeroshot_retrieval", "language": "en",
                      "metrics": clip_benchmark_metrics(images, captions, ids)}
    assert list(result["metrics"])[:2] == ["image_retrieval_recall@1", "text_retrieval_recall@1"]


def run(cwd, *args):
    """`python -m search ...` the way a user runs it, from `cwd` with relative paths."""
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_eval_cli_writes_per_query_lines_and_clip_benchmark_json(tmp_path, tiny_model_spec):
    build_test_index(tmp_path, make_pairs(40, seed=4), tiny_model_spec, name="ix")
    done = run(tmp_path, "eval", "--index", "ix", "--per-query", "out/q.jsonl", "--format", "clip_benchmark",
               "--dataset", "shapes")
    assert "No such file" in done.stderr or "cannot write" in done.stderr
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    (tmp_path / "out").mkdir()
    done = run(tmp_path, "eval", "--index", "ix", "--per-query", "out/q.jsonl", "--format", "clip_benchmark",
               "--dataset", "shapes")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    image_vectors = np.load(tmp_path / "ix" / "image_vectors.npy")
    caption_vectors = np.load(tmp_path / "ix" / "caption_vectors.npy")
    truth = np.repeat(np.arange(40), 3)
    assert result["metrics"] == clip_benchmark_metrics(image_vectors, caption_vectors, truth)
    assert (result["dataset"], result["task"], result["pretrained"]) == ("shapes", "zeroshot_retrieval", None)
    assert result["model"] == json.loads((tmp_path / "ix" / "manifest.json").read_text())["encoder"]["model"]
    assert result["model"].startswith("local-dir:")

    lines = [json.loads(line) for line in (tmp_path / "out" / "q.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["text_to_image"] * 120 + ["image_to_text"] * 40
    expected = brute_force(image_vectors, caption_vectors, truth, "position")
    for line in lines:
        rank, score, beaten = expected[line["kind"], line["query_id"]]
        assert (line["rank"], line["score"]) == (rank, score)
        assert [(b["id"], b["score"]) for b in line["beaten_by"]] == list(beaten)
        key = "image" if line["kind"] == "text_to_image" else "caption"
        assert all(set(b) == {"id", "score", key} for b in line["beaten_by"])
    caption = lines[3]
    assert caption["query"] == make_pairs(40, seed=4)[1][1][0] and caption["gold"] == [1]
    assert lines[121]["query"] == "img_001.png" and lines[121]["gold"] == [3, 4, 5]
    # recall@k from the lines' ranks is `search eval`'s (no repeated texts here: position and topk agree)
    table = json.loads(run(tmp_path, "eval", "--index", "ix", "--json").stdout)
    for kind in KINDS:
        ranks = np.array([line["rank"] for line in lines if line["kind"] == kind])
        assert {k: 100 * int((ranks <= k).sum()) / len(ranks) for k in (1, 5, 10)} == \
            {k: table[kind][f"R@{k}"] for k in (1, 5, 10)}


def test_eval_refuses_contradictory_options(tmp_path, tiny_model_spec, capsys):
    build_test_index(tmp_path, make_pairs(4), tiny_model_spec, name="ix")
    for extra in (["--format", "clip_benchmark", "--ties", "strict"], ["--format", "clip_benchmark", "--json"],
                  ["--dataset", "x"]):
        assert search_main(["eval", "--index", str(tmp_path / "ix"), *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, extra


def test_eval_writes_the_recall_at_k_curves_it_computes(tmp_path, tiny_model_spec):
    """`search eval --plots DIR` from another directory: one readable image per direction, whose curve is the
    per-query recall (which equals search eval's numbers, tested above)."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from search.per_query import KINDS, per_query
    from search.store import open_index

    from .helpers import build_test_index, make_pairs

    build_test_index(tmp_path, make_pairs(8, seed=4), tiny_model_spec)
    done = subprocess.run([sys.executable, "-m", "search", "eval", "--index", "index", "--plots", "plots",
                           "--plot-format", "png"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for kind in KINDS:
        with Image.open(tmp_path / "plots" / f"recall_{kind}.png") as image:
            assert image.size[0] > 100 and image.format == "PNG"
    curve = per_query(open_index(tmp_path / "index")).curve("text_to_image")
    assert list(curve) == list(range(1, 51)) and curve[50] == 100.0 and curve == dict(sorted(curve.items()))
    assert all(a <= b for a, b in zip(list(curve.values()), list(curve.values())[1:]))
    assert str(Path("plots") / "recall_text_to_image.png") in done.stderr


def test_clip_benchmark_json_names_flickr8k_as_clip_benchmark_does(tmp_path, tiny_model_spec):
    import json
    import subprocess
    import sys

    from .helpers import build_flickr8k_index

    work = build_flickr8k_index(tmp_path, tiny_model_spec)
    done = subprocess.run([sys.executable, "-m", "search", "eval", "--index", "index", "--format", "clip_benchmark"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dataset"] == "flickr8k"
