import json

import numpy as np
import pytest

from indexer.cli import main as indexer_main
from search.cli import main as search_main
from search.metrics import retrieval_metrics

from .helpers import make_pairs, reference_recall, write_images, write_karpathy


def test_ranks_on_hand_made_vectors():
    images = np.eye(3, dtype=np.float32)
    # caption 0 → image 0 best (rank 1); caption 1 (of image 1) prefers image 2 (rank 2); caption 2 → image 2 (rank 1)
    captions = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0, 1]], np.float32)
    m = retrieval_metrics(images, captions, [0, 1, 2], ks=(1, 2))
    assert m["text_to_image"] == {"R@1": pytest.approx(200 / 3, abs=1e-3), "R@2": 100.0,
                                  "mean_rank": pytest.approx(4 / 3, abs=1e-3), "median_rank": 1.0}
    # image 1's only caption (0.6) is beaten by nothing for image 1: column of image 1 = [0, 0.6, 0]
    assert m["image_to_text"]["R@1"] == 100.0


def test_ties_count_against_the_correct_item():
    collapsed = np.ones((4, 2), np.float32) / np.sqrt(2)  # every image and caption embedded identically
    m = retrieval_metrics(collapsed, collapsed, [0, 1, 2, 3], ks=(1, 4))
    for direction in ("text_to_image", "image_to_text"):
        assert m[direction]["R@1"] == 0.0 and m[direction]["R@4"] == 100.0 and m[direction]["mean_rank"] == 4.0


def test_image_to_text_counts_the_best_of_several_captions():
    images = np.array([[1, 0], [0, 1]], np.float32)
    captions = np.array([[0, 1], [0.9, 0.1], [0.1, 0.9]], np.float32)  # image 0: captions 0 (bad) and 1 (good)
    m = retrieval_metrics(images, captions, [0, 0, 1], ks=(1, 2))
    # image 0: its second caption ranks first (a first-caption-only rule would give rank 3, R@1 = 0);
    # image 1: caption 0 (1.0) beats its own caption (0.9), rank 2
    assert m["image_to_text"]["R@1"] == 50.0 and m["image_to_text"]["R@2"] == 100.0
    assert m["text_to_image"]["R@1"] == pytest.approx(200 / 3, abs=1e-3)


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
        assert search_main(["eval", "--index", str(out), "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["n_images"] == 50 and metrics["n_captions"] == 150
        image_vectors, caption_vectors = np.load(out / "image_vectors.npy"), np.load(out / "caption_vectors.npy")
        truth = np.repeat(np.arange(50), 3)
        for k in (1, 5, 10):
            t2i, i2t = reference_recall(image_vectors, caption_vectors, truth, k)
            assert metrics["text_to_image"][f"R@{k}"] == pytest.approx(t2i, abs=1e-3)
            assert metrics["image_to_text"][f"R@{k}"] == pytest.approx(i2t, abs=1e-3)
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
