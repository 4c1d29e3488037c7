import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import search.metrics as metrics_module
from indexer.cli import main as indexer_main
from search.cli import main as search_main
from search.errors import NoCaptionsError, QueryError
from search.metrics import index_recall, retrieval_metrics
from search.recall import RetrievalMetrics, RetrievalRecall
from search.vector_index import VectorIndex

from .helpers import build_test_index, make_pairs, reference_recall, write_images, write_karpathy

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)


def clip_benchmark_recall(image_vectors: np.ndarray, caption_vectors: np.ndarray, caption_image_ids) -> dict:
    """{(direction, k): percent} computed by CLIP_benchmark's own code, as its zeroshot_retrieval.evaluate does (only
    the final mean is taken in float64 rather than float32, to compare to 1e-9)."""
    try:
        from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("clip-benchmark is not installed; install.sh installs it")
        pytest.skip("clip-benchmark not installed (bash install.sh)")
    scores = torch.from_numpy(caption_vectors) @ torch.from_numpy(image_vectors).t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), torch.as_tensor(np.asarray(caption_image_ids))] = True
    result = {}
    for k in KS:
        for direction, s, p in (("text_to_image", scores, positive_pairs),
                                ("image_to_text", scores.T, positive_pairs.T)):
            hits = batchify(recall_at_k, s, p, 64, "cpu", k=k) > 0
            result[direction, k] = 100 * hits.double().mean().item()
    return result


def tied_vectors(n_images: int, seed: int, dim: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, captions, caption image ids): 5 noisy captions per image, some images duplicated exactly, and many
    captions shared word for word (identical vectors) by 2-4 images, as COCO repeats captions. 512-d: at that width
    numpy's BLAS gives identical vectors different scores, which CLIP_benchmark's torch product does not."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    images[1:4] = images[0]
    images[n_images // 2 + 1] = images[n_images // 2]
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    ids = np.repeat(np.arange(n_images), 5)
    captions = images[ids] + 0.9 * rng.standard_normal((len(ids), dim)).astype(np.float32)
    for _ in range(n_images // 4):
        members = rng.choice(n_images, rng.integers(2, 5), replace=False)
        shared = images[members].mean(axis=0) + 0.2 * rng.standard_normal(dim).astype(np.float32)
        captions[members * 5 + rng.integers(0, 5)] = shared
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return images, captions, ids


def test_ranks_on_hand_made_vectors():
    images = np.eye(3, dtype=np.float32)
    # caption 0 → image 0 best (rank 1); caption 1 (of image 1) prefers image 2 (rank 2); caption 2 → image 2 (rank 1)
    captions = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0, 1]], np.float32)
    m = retrieval_metrics(images, captions, [0, 1, 2], ks=(1, 2)).to_json()
    assert m["text_to_image"] == {"R@1": pytest.approx(200 / 3, abs=1e-3), "R@2": 100.0,
                                  "mean_rank": pytest.approx(4 / 3, abs=1e-3), "median_rank": 1.0}
    # image 1's only caption (0.6) is beaten by nothing for image 1: column of image 1 = [0, 0.6, 0]
    assert m["image_to_text"]["R@1"] == 100.0


def test_strict_ties_count_against_the_correct_item():
    collapsed = np.ones((4, 2), np.float32) / np.sqrt(2)  # every image and caption embedded identically
    m = retrieval_metrics(collapsed, collapsed, [0, 1, 2, 3], ks=(1, 4), ties="strict").to_json()
    assert m["ties"] == "strict"
    for direction in ("text_to_image", "image_to_text"):
        assert m[direction]["R@1"] == 0.0 and m[direction]["R@4"] == 100.0 and m[direction]["mean_rank"] == 4.0


def test_position_ties_rank_the_lower_index_first():
    collapsed = np.ones((4, 2), np.float32) / np.sqrt(2)
    m = retrieval_metrics(collapsed, collapsed, [0, 1, 2, 3], ks=(1, 4), ties="position").to_json()
    for direction in ("text_to_image", "image_to_text"):  # item j ranks j + 1
        assert m[direction]["R@1"] == 25.0 and m[direction]["R@4"] == 100.0 and m[direction]["mean_rank"] == 2.5
    # two images whose captions repeat word for word: image 0 finds its own copy first, image 1 finds image 0's
    images = np.array([[1, 0], [0.8, 0.6]], np.float32)
    captions = np.array([[0.6, 0.8], [0.6, 0.8]], np.float32)
    for ties, expected in (("position", 50.0), ("strict", 0.0)):
        assert retrieval_metrics(images, captions, [0, 1], ks=(1,), ties=ties).to_json()["image_to_text"]["R@1"] \
            == expected


def test_unknown_tie_rule_is_refused():
    with pytest.raises(QueryError, match="unknown tie rule"):
        retrieval_metrics(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), [0, 1], ties="random")


@pytest.mark.parametrize("block_scores", [None, 3000, 40000])
def test_score_blocks_are_bitwise_clip_benchmarks_single_product(block_scores, monkeypatch):
    if block_scores:
        monkeypatch.setattr(metrics_module, "_BLOCK_SCORES", block_scores)
    images, captions, _ = tied_vectors(300, seed=1)
    product = (torch.from_numpy(captions) @ torch.from_numpy(images).t()).numpy()
    for queries, expected in (("captions", product), ("images", product.T)):
        blocks = list(metrics_module.score_blocks(queries, images, captions))
        assert [(start, stop) for start, stop, _ in blocks][-1][1] == len(expected)
        assert np.array_equal(np.concatenate([block for _, _, block in blocks]), expected)


@pytest.mark.parametrize("n_images", [700, 40])  # over / under 64 * k candidates: torch.topk's heap / nth_element
@pytest.mark.parametrize("block_scores", [None, 3000])  # one block / many blocks of the score matrix
def test_recall_equals_clip_benchmark_and_an_exact_index(n_images, block_scores, monkeypatch):
    if block_scores:
        monkeypatch.setattr(metrics_module, "_BLOCK_SCORES", block_scores)
    images, captions, ids = tied_vectors(n_images, seed=n_images)
    oracle = clip_benchmark_recall(images, captions, ids)
    flat = VectorIndex.build(images, "Flat"), VectorIndex.build(captions, "Flat")
    ivf = VectorIndex.build(images, "IVF4,Flat"), VectorIndex.build(captions, "IVF8,Flat")
    ivf[0].set_params({"nprobe": 4})
    ivf[1].set_params({"nprobe": 8})  # every cell probed: exhaustive, though FAISS orders and rounds its own way
    by_rule = {}
    for ties in ("clip_benchmark", "position", "strict"):
        m = by_rule[ties] = retrieval_metrics(images, captions, ids, ties=ties, indexes=flat).to_json()
        assert m["index_search"] == {d: {f"R@{k}": m[d][f"R@{k}"] for k in KS}
                                     for d in ("text_to_image", "image_to_text")}
        assert index_recall(*ivf, images, captions, ids, ties=ties).to_json() == m["index_search"]
    for (direction, k), expected in oracle.items():
        assert by_rule["clip_benchmark"][direction][f"R@{k}"] == pytest.approx(expected, abs=1e-9), (direction, k)
    # the ties decide something in both directions, or this test would prove little
    for direction in ("text_to_image", "image_to_text"):
        assert any(by_rule["strict"][direction][f"R@{k}"] < by_rule["clip_benchmark"][direction][f"R@{k}"] for k in KS)
    if n_images <= 100:  # the sorting reference is slow
        for ties in ("position", "strict"):
            for k in KS:
                assert (by_rule[ties]["text_to_image"][f"R@{k}"], by_rule[ties]["image_to_text"][f"R@{k}"]) == \
                    pytest.approx(reference_recall(images, captions, ids, k, ties), abs=1e-9)


def test_image_to_text_counts_the_best_of_several_captions():
    images = np.array([[1, 0], [0, 1]], np.float32)
    captions = np.array([[0, 1], [0.9, 0.1], [0.1, 0.9]], np.float32)  # image 0: captions 0 (bad) and 1 (good)
    m = retrieval_metrics(images, captions, [0, 0, 1], ks=(1, 2)).to_json()
    # image 0: its second caption ranks first (a first-caption-only rule would give rank 3, R@1 = 0);
    # image 1: caption 0 (1.0) beats its own caption (0.9), rank 2
    assert m["image_to_text"]["R@1"] == 50.0 and m["image_to_text"]["R@2"] == 100.0
    assert m["text_to_image"]["R@1"] == pytest.approx(200 / 3, abs=1e-3)


def test_recall_results_round_trip_their_json_and_format_in_one_way():
    images = np.eye(3, dtype=np.float32)
    captions = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0, 1]], np.float32)  # as in test_ranks_on_hand_made_vectors
    flat = VectorIndex.build(images, "Flat"), VectorIndex.build(captions, "Flat")
    m = retrieval_metrics(images, captions, [0, 1, 2], ks=(1, 2), indexes=flat)
    assert RetrievalMetrics.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert RetrievalRecall.from_json(m.to_json()["index_search"]) == m.index_search
    assert m.recall.format(digits=2) == "text→image R@1/2 66.67/100.00, image→text R@1/2 100.00/100.00"
    assert m.recall.format(ks=(2,)) == "text→image R@2 100.0, image→text R@2 100.0"
    assert m.index_search.to_json() == {d: {f"R@{k}": m.to_json()[d][f"R@{k}"] for k in (1, 2)}
                                        for d in ("text_to_image", "image_to_text")}
    with pytest.raises(NoCaptionsError, match="has no captions"):  # not a query error: no query fixes it
        retrieval_metrics(images, np.zeros((0, 3), np.float32), [])


def test_eval_agrees_with_independent_reference_on_a_trained_model(tmp_path, trained_model_dir, tiny_model_dir,
                                                                   capsys):
    pairs = make_pairs(50, seed=1)  # the pairs the trained model memorised
    images = write_images(tmp_path / "images", pairs)
    ann = write_karpathy(tmp_path / "k.json", pairs, ["test"] * 50)
    results = {}
    for name, model in (("trained", trained_model_dir), ("random", tiny_model_dir)):
        out = tmp_path / name
        assert indexer_main(["build", "--format", "karpathy", "--annotations", str(ann), "--images", str(images),
                             "--split", "test", "--out", str(out), "--model", f"local-dir:{model}", "--quiet"]) == 0
        capsys.readouterr()
        image_vectors, caption_vectors = np.load(out / "image_vectors.npy"), np.load(out / "caption_vectors.npy")
        truth = np.repeat(np.arange(50), 3)
        for ties in ("position", "strict"):
            assert search_main(["eval", "--index", str(out), "--json", "--ties", ties]) == 0
            metrics = json.loads(capsys.readouterr().out)
            assert metrics["n_images"] == 50 and metrics["n_captions"] == 150 and metrics["ties"] == ties
            for k in (1, 5, 10):
                t2i, i2t = reference_recall(image_vectors, caption_vectors, truth, k, ties)
                assert metrics["text_to_image"][f"R@{k}"] == pytest.approx(t2i, abs=1e-9)
                assert metrics["image_to_text"][f"R@{k}"] == pytest.approx(i2t, abs=1e-9)
        results[name] = metrics
    # the reference agreement means something only if the model has real signal: far above chance (10/50 = 20%)
    assert results["trained"]["text_to_image"]["R@10"] >= 60
    assert results["trained"]["image_to_text"]["R@1"] > results["random"]["image_to_text"]["R@1"]
    assert search_main(["eval", "--index", str(tmp_path / "trained")]) == 0
    assert "text→image" in capsys.readouterr().out


def test_eval_of_a_folder_index_says_there_are_no_captions(tmp_path, tiny_model_spec, capsys):
    images = write_images(tmp_path / "images", make_pairs(3))
    assert indexer_main(["build", "--format", "folder", "--images", str(images), "--out", str(tmp_path / "ix"),
                         "--model", tiny_model_spec, "--quiet"]) == 0
    assert search_main(["eval", "--index", str(tmp_path / "ix")]) == 1
    assert "has no captions" in capsys.readouterr().err


def repeating_pairs():
    """96 images with 7 captions each (672 captions: torch.topk's heap for k <= 10 over them), most of which other
    images share word for word ('a picture' all of them, 'a circle' a quarter, ...)."""
    pairs = []
    for name, captions, (shape, colour, bg) in make_pairs(96, seed=3):
        pairs.append((name, captions + (f"a {shape}", f"something {colour}", f"a {bg} picture", "a picture"),
                      (shape, colour, bg)))
    return pairs


@pytest.mark.slow
def test_eval_cli_on_repeated_captions_equals_clip_benchmark(tmp_path, tiny_model_spec):
    pairs = repeating_pairs()
    build_test_index(tmp_path, pairs, tiny_model_spec, name="ix")
    image_vectors, caption_vectors = np.load(tmp_path / "ix" / "image_vectors.npy"), np.load(tmp_path / "ix" /
                                                                                            "caption_vectors.npy")
    truth = np.repeat(np.arange(96), 7)
    oracle = clip_benchmark_recall(image_vectors, caption_vectors, truth)
    counts = Counter(c for _, captions, _ in pairs for c in captions)

    def run(*extra):  # the way a user runs it, from the folder holding the index, with a relative path
        done = subprocess.run([sys.executable, "-m", "search", "eval", "--index", "ix", *extra], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    by_rule = {}
    for ties in ("clip_benchmark", "strict"):
        m = by_rule[ties] = json.loads(run("--json", *(["--ties", ties] if ties != "clip_benchmark" else [])))
        assert m["ties"] == ties
        assert m["repeated_caption_texts"] == sum(1 for c in counts.values() if c > 1)
        assert m["captions_with_repeated_text"] == sum(c for c in counts.values() if c > 1)
        assert m["index_search"]["factories"] == {"images": "Flat", "captions": "Flat"}
        for direction in ("text_to_image", "image_to_text"):  # an exact index gives exactly the exact numbers
            assert m["index_search"][direction] == {f"R@{k}": m[direction][f"R@{k}"] for k in KS}
    for (direction, k), expected in oracle.items():
        assert by_rule["clip_benchmark"][direction][f"R@{k}"] == pytest.approx(expected, abs=1e-9), (direction, k)
    assert any(by_rule["strict"]["image_to_text"][f"R@{k}"] < by_rule["clip_benchmark"]["image_to_text"][f"R@{k}"]
               for k in KS)  # the repeated captions tie, and the rule decides
    table = run()
    assert f"{by_rule['clip_benchmark']['repeated_caption_texts']} caption texts occur more than once" in table
    assert "as CLIP_benchmark" in table
    bad = subprocess.run([sys.executable, "-m", "search", "eval", "--index", "ix", "--ties", "random"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--ties" in bad.stderr
