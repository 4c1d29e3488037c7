import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.cli import main as indexer_main
from search.store import open_index

from .helpers import make_pairs, write_coco, write_csv, write_flickr8k, write_images, write_karpathy

ROOT = Path(__file__).resolve().parents[1]
PAIRS = make_pairs(8)
SPLITS = ["test"] * 6 + ["train"] * 2


def build(*args, model=None):
    return indexer_main(["build", *map(str, args), "--quiet", *(["--model", model] if model else [])])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if any(m in p.name for m in (".tmp-", ".old-", ".partial"))]


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images", PAIRS)


@pytest.mark.parametrize("fmt", ["karpathy", "flickr8k", "coco", "csv", "folder"])
def test_build_every_format(tmp_path, images, tiny_model_spec, tiny_encoder, fmt, capsys):
    annotations = {
        "karpathy": lambda: write_karpathy(tmp_path / "dataset_flickr8k.json", PAIRS, SPLITS),
        "flickr8k": lambda: write_flickr8k(tmp_path / "f8k", PAIRS, SPLITS),
        "coco": lambda: write_coco(tmp_path / "captions_val2017.json", PAIRS),
        "csv": lambda: write_csv(tmp_path / "pairs.csv", PAIRS),
        "folder": lambda: None,
    }[fmt]()
    split = ["--split", "test"] if fmt in ("karpathy", "flickr8k") else []
    ann = ["--annotations", annotations] if annotations else []
    out = tmp_path / "index"
    assert build("--format", fmt, *ann, "--images", images, *split, "--out", out, model=tiny_model_spec) == 0
    n_images = 6 if split else 8
    n_captions = 0 if fmt == "folder" else 3 * n_images
    assert f"indexed {n_images} images and {n_captions} captions" in capsys.readouterr().out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["dim"] == 32 and manifest["metric"] == "ip"
    assert manifest["encoder"]["model"] == tiny_model_spec and manifest["fingerprint"] == tiny_encoder.fingerprint
    assert (manifest["n_images"], manifest["n_captions"]) == (n_images, n_captions)
    assert manifest["image_factory"] == "Flat" and manifest["source"]["format"] == fmt and manifest["created"]
    assert manifest["skipped"] == []

    with sqlite3.connect(out / "catalog.sqlite") as db:
        rows = db.execute("SELECT id, path, width, height FROM images ORDER BY id").fetchall()
        assert rows[0] == (0, PAIRS[0][0], 48, 48) and len(rows) == n_images
        assert db.execute("SELECT COUNT(*) FROM captions").fetchone()[0] == n_captions
    image_vectors = np.load(out / "image_vectors.npy")
    assert image_vectors.shape == (n_images, 32) and image_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1, atol=1e-5)
    assert np.load(out / "caption_vectors.npy").shape == (n_captions, 32)
    assert faiss.read_index(str(out / "images.faiss")).ntotal == n_images
    # the stored vectors are what the encoder gives for those files
    from search.images import load_image
    expected = tiny_encoder.encode_images([load_image(images / PAIRS[1][0])])[0]
    np.testing.assert_allclose(image_vectors[1], expected, atol=1e-5)
    assert leftovers(tmp_path) == []


def test_unreadable_images_are_skipped_counted_and_listed(tmp_path, images, tiny_model_spec, capsys):
    (images / PAIRS[0][0]).unlink()
    (images / PAIRS[1][0]).write_bytes(b"garbage, not a png")
    (images / PAIRS[2][0]).write_bytes((images / PAIRS[3][0]).read_bytes()[:120])  # truncated
    ann = write_karpathy(tmp_path / "k.json", PAIRS, SPLITS)
    assert build("--format", "karpathy", "--annotations", ann, "--images", images, "--out", tmp_path / "ix",
                 model=tiny_model_spec) == 0
    assert "skipped 3" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert "file not found" in reasons[PAIRS[0][0]] and "not an image" in reasons[PAIRS[1][0]]
    assert "cannot decode" in reasons[PAIRS[2][0]]
    assert manifest["n_images"] == 5 and manifest["n_captions"] == 15


def test_nothing_readable_is_an_error_and_leaves_no_index(tmp_path, tiny_model_spec, capsys):
    (tmp_path / "empty_images").mkdir()
    ann = write_karpathy(tmp_path / "k.json", PAIRS, SPLITS)
    code = build("--format", "karpathy", "--annotations", ann, "--images", tmp_path / "empty_images",
                 "--out", tmp_path / "ix", model=tiny_model_spec)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: none of the 8 images could be read") and err.count("\n") == 1
    assert not (tmp_path / "ix").exists() and leftovers(tmp_path) == []


def test_existing_index_needs_overwrite_and_failed_rebuild_keeps_it(tmp_path, images, tiny_model_spec, capsys):
    ann = write_csv(tmp_path / "p.csv", PAIRS)
    args = ["--format", "csv", "--annotations", ann, "--images", images, "--out", tmp_path / "ix"]
    assert build(*args, model=tiny_model_spec) == 0
    before = (tmp_path / "ix" / "manifest.json").read_text()
    assert build(*args, model=tiny_model_spec) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # a rebuild that fails half-way (no image readable) must not lose the index already there
    broken = ["--format", "csv", "--annotations", ann, "--images", tmp_path, "--out", tmp_path / "ix", "--overwrite"]
    assert build(*broken, model=tiny_model_spec) == 1
    assert (tmp_path / "ix" / "manifest.json").read_text() == before
    assert open_index(tmp_path / "ix").manifest.n_images == 8
    assert build(*args, "--overwrite", model=tiny_model_spec) == 0
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_that_is_not_an_index(tmp_path, images, tiny_model_spec, capsys):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    code = build("--format", "folder", "--images", images, "--out", tmp_path / "precious", "--overwrite",
                 model=tiny_model_spec)
    err = capsys.readouterr().err
    assert code == 1 and "not an index; choose another --out" in err and "pass --overwrite" not in err
    code = build("--format", "folder", "--images", images, "--out", tmp_path / "precious", model=tiny_model_spec)
    err = capsys.readouterr().err  # without --overwrite: the same advice, never "pass --overwrite"
    assert code == 1 and "not an index; choose another --out" in err and "pass --overwrite" not in err
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_model_errors_are_one_line(tmp_path, images, capsys):
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "open_clip_config.json").write_text("{}")
    for model, message in ((f"local-dir:{tmp_path / 'no_weights'}", "has no weights file"),
                           (f"local-dir:{tmp_path / 'nowhere'}", "has no open_clip_config.json"),
                           ("ViT-Q-99", "unknown open_clip model 'ViT-Q-99'")):
        assert build("--format", "folder", "--images", images, "--out", tmp_path / "ix", model=model) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert indexer_main(["build", "--format", "folder", "--images", str(images), "--out", str(tmp_path / "ix"),
                         "--model", "RN50", "--pretrained", str(tmp_path / "missing.pt"), "--quiet"]) == 1
    assert "missing.pt' is neither an existing file nor a tag of RN50" in capsys.readouterr().err


def test_default_model_without_network_fails_fast_with_advice(tmp_path, images):
    """The real download path: offline (forced here, so the test means the same with a network), one clear line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", str(images),
                             "--out", str(tmp_path / "ix"), "--quiet"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert "cannot download weights for ViT-B-32 (laion2b_s34b_b79k)" in result.stderr
    assert "--pretrained /path/to/" in result.stderr and "local-dir:" in result.stderr
    assert not (tmp_path / "ix").exists()
