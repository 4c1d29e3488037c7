import os
import sqlite3

import numpy as np

from indexer import loader
from indexer.cli import main as indexer_main

from .helpers import draw, make_pairs, write_csv, write_images

PAIRS = make_pairs(14, seed=21)


def catalog(index):
    with sqlite3.connect(index / "catalog.sqlite") as db:
        images = db.execute("SELECT path, width, height FROM images ORDER BY id").fetchall()
        captions = db.execute("SELECT image_id, text FROM captions ORDER BY id").fetchall()
    return images, captions


def assert_same_index(updated, fresh):
    assert catalog(updated) == catalog(fresh)
    for name in ("image_vectors.npy", "caption_vectors.npy"):
        np.testing.assert_allclose(np.load(updated / name), np.load(fresh / name), atol=1e-5)


def build(args, model):
    return indexer_main([*args, "--model", model, "--quiet"])


def test_update_equals_a_fresh_build_and_decodes_only_what_changed(tmp_path, tiny_model_spec, monkeypatch, capsys):
    photos = write_images(tmp_path / "photos", PAIRS[:12])
    index = tmp_path / "index"
    assert build(["build", "--format", "folder", "--images", str(photos), "--out", str(index)], tiny_model_spec) == 0
    # between updates: one new file, one modified, one renamed, one deleted, one touched (same bytes, newer mtime)
    draw(*PAIRS[12][2]).save(photos / "new.png")
    draw(*PAIRS[13][2]).save(photos / PAIRS[1][0])
    os.rename(photos / PAIRS[2][0], photos / "renamed.png")
    os.remove(photos / PAIRS[3][0])
    stat = (photos / PAIRS[4][0]).stat()
    os.utime(photos / PAIRS[4][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    os.utime(photos / PAIRS[1][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 9_000_000_000))

    decoded = []
    real_load = loader.load_image
    monkeypatch.setattr(loader, "load_image", lambda *a, **k: decoded.append(k.get("name")) or real_load(*a, **k))
    capsys.readouterr()
    assert indexer_main(["update", "--index", str(index), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "1 new, 1 changed, 1 moved, 9 unchanged, 1 removed" in summary
    assert sorted(os.path.basename(d) for d in decoded) == sorted(["new.png", PAIRS[1][0]])
    monkeypatch.setattr(loader, "load_image", real_load)

    fresh = tmp_path / "fresh"
    assert build(["build", "--format", "folder", "--images", str(photos), "--out", str(fresh)], tiny_model_spec) == 0
    assert_same_index(index, fresh)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []  # no temporary directories left (the writer locks' files stay, by design)
    assert indexer_main(["verify", "--index", str(index)]) == 0


def test_update_of_a_captioned_dataset_follows_the_annotations(tmp_path, tiny_model_spec):
    photos = write_images(tmp_path / "photos", PAIRS)
    ann = write_csv(tmp_path / "pairs.csv", PAIRS[:10])
    index = tmp_path / "index"
    assert build(["build", "--format", "csv", "--annotations", str(ann), "--images", str(photos), "--out",
                  str(index)], tiny_model_spec) == 0
    edited = [(name, (caps[0] + " at dusk",) + caps[1:], attrs) for name, caps, attrs in PAIRS[2:13]]
    write_csv(ann, edited)  # two images leave, three arrive, every first caption changes
    assert indexer_main(["update", "--index", str(index), "--quiet"]) == 0
    fresh = tmp_path / "fresh"
    assert build(["build", "--format", "csv", "--annotations", str(ann), "--images", str(photos), "--out",
                  str(fresh)], tiny_model_spec) == 0
    assert_same_index(index, fresh)


def test_update_errors(tmp_path, tiny_model_spec, trained_model_dir, capsys):
    assert indexer_main(["update", "--index", str(tmp_path)]) == 1
    assert "is not an index" in capsys.readouterr().err
    photos = write_images(tmp_path / "photos", PAIRS[:3])
    index = tmp_path / "index"
    assert build(["build", "--format", "folder", "--images", str(photos), "--out", str(index)], tiny_model_spec) == 0
    for path in photos.iterdir():
        path.unlink()
    before = catalog(index)
    assert indexer_main(["update", "--index", str(index), "--quiet"]) == 1  # nothing left: refused, index kept
    assert "no images listed" in capsys.readouterr().err and catalog(index) == before


def test_an_interrupted_update_keeps_the_old_index_and_resumes(tmp_path, tiny_model_spec, monkeypatch):
    from indexer import writer as writer_module

    photos = write_images(tmp_path / "photos", PAIRS[:6])
    index = tmp_path / "index"
    assert build(["build", "--format", "folder", "--images", str(photos), "--out", str(index)], tiny_model_spec) == 0
    before = catalog(index)
    write_images(tmp_path / "photos", PAIRS[6:])
    real_checkpoint = writer_module.IndexWriter.checkpoint

    def interrupted(self, *a):
        real_checkpoint(self, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.IndexWriter, "checkpoint", interrupted)
    assert indexer_main(["update", "--index", str(index), "--batch-size", "4", "--quiet"]) == 130
    monkeypatch.setattr(writer_module.IndexWriter, "checkpoint", real_checkpoint)
    assert catalog(index) == before  # readers still see the complete old version
    assert indexer_main(["update", "--index", str(index), "--batch-size", "4", "--resume", "--quiet"]) == 0
    fresh = tmp_path / "fresh"
    assert build(["build", "--format", "folder", "--images", str(photos), "--out", str(fresh)], tiny_model_spec) == 0
    assert_same_index(index, fresh)
