"""Plots where people look: the ANN recall of the index in use over its updates, and the fine-tune curve of the model
behind it, served as images (/plot/…) and shown on /eval when there is something to show."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from indexer.cli import main as indexer_main
from web import create_app

from .helpers import make_pairs, write_images, write_karpathy

PAIRS = make_pairs(40, seed=8)
ROOT = Path(__file__).resolve().parents[1]


def _png(response) -> Image.Image:
    assert response.status_code == 200 and response.mimetype == "image/png"
    image = Image.open(io.BytesIO(response.data))
    image.load()
    return image


@pytest.fixture(scope="module")
def model_with_record(tmp_path_factory, trained_model_dir):
    """The trained tiny model with the training.json a fine-tune leaves beside it (two epochs and a baseline)."""
    folder = tmp_path_factory.mktemp("tuned") / "model"
    shutil.copytree(trained_model_dir, folder)
    recall = {"text_to_image": {"R@1": 20.0, "R@5": 50.0, "R@10": 70.0},
              "image_to_text": {"R@1": 30.0, "R@5": 60.0, "R@10": 80.0}}
    run = {"baseline": {"epoch": 0, "val": recall, "guard": recall},
           "history": [{"epoch": 1, "val": recall, "guard": recall}, {"epoch": 2, "val": recall, "guard": recall}]}
    (folder / "training.json").write_text(json.dumps(run))
    return folder


def test_ann_recall_plot_follows_updates_and_exact_indexes_have_none(tmp_path, tiny_model_spec):
    images = write_images(tmp_path / "images", PAIRS[:30])
    annotations = write_karpathy(tmp_path / "k.json", PAIRS[:30], ["test"] * 30)
    common = ["--model", tiny_model_spec, "--quiet"]
    assert indexer_main(["build", "--format", "karpathy", "--annotations", str(annotations), "--images", str(images),
                         "--out", str(tmp_path / "ivf"), "--index-type", "IVF2,Flat", *common]) == 0
    client = create_app(index=str(tmp_path / "ivf")).test_client()
    history = client.get("/api/stats").get_json()["indexes"]["images"]["recall_history"]
    assert len(history) == 1 and history[0][0] == 0.0  # at build: nothing added since training
    assert _png(client.get("/plot/ann.png")).size[0] >= 400
    assert b'id="ann-plot"' in client.get("/eval").data
    write_images(images, PAIRS[30:])
    write_karpathy(annotations, PAIRS, ["test"] * 40)
    assert indexer_main(["update", "--index", str(tmp_path / "ivf"), "--quiet"]) == 0
    client = create_app(index=str(tmp_path / "ivf")).test_client()
    stats = client.get("/api/stats").get_json()["indexes"]["images"]
    if stats["share_added_since_training"]:  # the quantiser was kept: the new point sits at the share added
        assert [p[0] for p in stats["recall_history"]] == [0.0, stats["share_added_since_training"]]
    else:  # trained again: the history starts over
        assert len(stats["recall_history"]) == 1
    assert stats["recall_history"][-1][1] == stats["recall_at_10"]
    _png(client.get("/plot/ann.png"))
    assert indexer_main(["build", "--format", "karpathy", "--annotations", str(annotations), "--images", str(images),
                         "--out", str(tmp_path / "flat"), *common]) == 0
    flat = create_app(index=str(tmp_path / "flat")).test_client()
    assert flat.get("/plot/ann.png").status_code == 404 and b'id="ann-plot"' not in flat.get("/eval").data
    for name, written in (("ivf", True), ("flat", False)):  # the same picture from the command line
        done = subprocess.run([sys.executable, "-m", "indexer", "info", "--index", name, "--plots", f"plots-{name}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"plots-{name}" / "ann_recall.png").is_file() == written, done.stderr


def test_the_fine_tune_curve_of_the_model_is_shown_when_it_has_one(tmp_path, model_with_record, trained_model_dir):
    images = write_images(tmp_path / "images", PAIRS[:12])
    annotations = write_karpathy(tmp_path / "k.json", PAIRS[:12], ["test"] * 12)
    for name, model in (("tuned", model_with_record), ("plain", trained_model_dir)):
        assert indexer_main(["build", "--format", "karpathy", "--annotations", str(annotations), "--images",
                             str(images), "--out", str(tmp_path / name), "--model", f"local-dir:{model}",
                             "--quiet"]) == 0
    tuned = create_app(index=str(tmp_path / "tuned")).test_client()
    assert _png(tuned.get("/plot/training.png")).size[0] >= 400
    assert b'id="training-plot"' in tuned.get("/eval").data
    plain = create_app(index=str(tmp_path / "plain")).test_client()
    assert plain.get("/plot/training.png").status_code == 404
    assert b'id="training-plot"' not in plain.get("/eval").data
