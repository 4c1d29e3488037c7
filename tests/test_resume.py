"""An interrupted build (kill -9 at random points, or Ctrl-C) resumes to exactly the index an uninterrupted build
makes."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer import writer as writer_module
from indexer.cli import main as indexer_main

ROOT = Path(__file__).resolve().parents[1]
N = 240


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = ["image,caption"]
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"p{i:03d}.png")
        rows += [f"p{i:03d}.png,photo number {i}", f"p{i:03d}.png,picture {i % 7} of a series"]
    rows.append("missing.png,a caption without its image")  # skipped: part of what must be resumed right
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def args(dataset, out, model):
    return ["build", "--format", "csv", "--annotations", str(dataset / "pairs.csv"), "--images",
            str(dataset / "images"), "--out", str(out), "--model", model, "--batch-size", "4", "--workers", "1",
            "--quiet"]


def snapshot(index):
    with sqlite3.connect(index / "catalog.sqlite") as db:
        tables = (db.execute("SELECT * FROM images ORDER BY id").fetchall(),
                  db.execute("SELECT * FROM captions ORDER BY id").fetchall())
    manifest = json.loads((index / "manifest.json").read_text())
    return tables, manifest["n_images"], manifest["n_captions"], manifest["skipped"]


def assert_equal_indexes(a, b):
    assert snapshot(a) == snapshot(b)
    for name in ("image_vectors.npy", "caption_vectors.npy"):
        np.testing.assert_allclose(np.load(a / name), np.load(b / name), atol=1e-5)


@pytest.fixture(scope="module")
def reference(dataset, tiny_model_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "index"
    assert indexer_main(args(dataset, out, tiny_model_spec)) == 0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_point_then_resume(dataset, reference, tiny_model_spec, tmp_path, seed):
    out = tmp_path / "index"
    progress = tmp_path / ".index.partial" / "progress.json"
    target = random.Random(seed).randint(8, N - 40)  # samples done before the kill
    process = subprocess.Popen([sys.executable, "-m", "indexer", *args(dataset, out, tiny_model_spec)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            done = json.loads(progress.read_text())["samples_done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= target:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not out.exists()  # readers never see a half-written index
    assert indexer_main(args(dataset, out, tiny_model_spec) + ["--resume"]) == 0
    assert_equal_indexes(out, reference)
    assert not (tmp_path / ".index.partial").exists()


def test_ctrl_c_keeps_the_work_then_resume_finishes_it(dataset, reference, tiny_model_spec, tmp_path, monkeypatch,
                                                       capsys):
    out = tmp_path / "index"
    real_checkpoint = writer_module.IndexWriter.checkpoint
    calls = {"n": 0}

    def interrupted(self, *a):
        real_checkpoint(self, *a)
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.IndexWriter, "checkpoint", interrupted)
    assert indexer_main(args(dataset, out, tiny_model_spec)) == 130
    monkeypatch.setattr(writer_module.IndexWriter, "checkpoint", real_checkpoint)
    progress = json.loads((tmp_path / ".index.partial" / "progress.json").read_text())
    assert progress["samples_done"] == 80 and not out.exists()
    capsys.readouterr()
    changed = args(dataset, out, tiny_model_spec)
    changed[changed.index("--images") + 1] = str(tmp_path)  # other arguments: refused, work kept
    assert indexer_main(changed + ["--resume"]) == 1
    assert "used other arguments" in capsys.readouterr().err
    assert indexer_main(args(dataset, out, tiny_model_spec) + ["--resume"]) == 0
    assert_equal_indexes(out, reference)
    assert indexer_main(args(dataset, tmp_path / "other", tiny_model_spec) + ["--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
