import json
import re
import shutil
import sqlite3

import numpy as np
import pytest

from indexer.cli import main as indexer_main

from .helpers import build_test_index, make_pairs

PAIRS = make_pairs(20, seed=9)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("verify"), PAIRS, tiny_model_spec)


def run_verify(path, capsys, *extra):
    code = indexer_main(["verify", "--index", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info(index_dir, capsys):
    assert indexer_main(["info", "--index", str(index_dir), "--json"]) == 0
    details = json.loads(capsys.readouterr().out)
    assert details["images"] == 20 and details["captions"] == 60 and details["dim"] == 32
    assert details["indexes"]["images"]["factory"] == "Flat" and details["disk_bytes"] > 0
    assert indexer_main(["info", "--index", str(index_dir)]) == 0
    out = capsys.readouterr().out
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())  # "label   value"
    assert lines["images"] == "20" and lines["captions"] == "60"
    assert lines["image index"].startswith("Flat (exact): ") and lines["image index"].endswith(" in memory")
    assert lines["model"].startswith("local-dir:")
    assert "{" not in out and "'" not in out  # readable text, not Python reprs of dicts
    assert lines["source"].startswith("karpathy: annotations ")


def test_a_sound_index_passes(index_dir, capsys):
    code, out, _ = run_verify(index_dir, capsys)
    assert code == 0 and "FAIL" not in out and "re-encoded images match stored vectors" in out
    assert "re-encoded captions match" in out and "all" in out.splitlines()[-1]


def _copy(index_dir, tmp_path):
    target = tmp_path / "index"
    shutil.copytree(index_dir, target)
    return target


def test_catalog_out_of_step_is_reported(index_dir, tmp_path, capsys):
    broken = _copy(index_dir, tmp_path)
    with sqlite3.connect(broken / "catalog.sqlite") as db:
        db.execute("DELETE FROM images WHERE id = 5")
    code, out, err = run_verify(broken, capsys, "--no-model")
    assert code == 1 and "FAIL: catalog holds 19 images" in out and "1 check(s) failed" in err


def test_swapped_vectors_are_caught_by_re_encoding(index_dir, tmp_path, capsys):
    broken = _copy(index_dir, tmp_path)
    vectors = np.load(broken / "image_vectors.npy")
    vectors[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]] = vectors[[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]  # rows no longer match files
    np.save(broken / "image_vectors.npy", vectors)
    code, out, _ = run_verify(broken, capsys, "--sample", "20")
    assert code == 1 and "FAIL: re-encoded images differ from stored vectors" in out
    assert "FAIL: images FAISS index misses" in out  # the FAISS index still holds the original order


def test_wrong_shapes_fingerprints_and_missing_files(index_dir, tmp_path, capsys, trained_model_dir):
    broken = _copy(index_dir, tmp_path)
    np.save(broken / "caption_vectors.npy", np.zeros((3, 32), np.float32))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["encoder"]["model"] = f"local-dir:{trained_model_dir}"  # same architecture, other weights
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run_verify(broken, capsys)
    assert code == 1 and "FAIL: captions vectors are (3, 32)" in out and "now has fingerprint" in out
    (broken / "captions.faiss").unlink()
    code, out, _ = run_verify(broken, capsys)
    assert code == 1 and "captions.faiss is missing" in out
    code, out, _ = run_verify(tmp_path / "nowhere", capsys)
    assert code == 1 and "no such index directory" in out


def test_missing_image_files_are_reported(index_dir, tmp_path, capsys):
    code, out, _ = run_verify(index_dir, capsys, "--images", str(tmp_path))
    assert code == 1 and "FAIL: 8 sampled image files are unreadable" in out and "file not found" in out
