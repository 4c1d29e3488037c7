"""`python -m indexer migrate` (issue 13): a format-2 index (made the way the previous program wrote it) becomes format
3 atomically: dates from the files, keyword index, vectors and FAISS files byte-identical, search results unchanged;
`indexer update` of a format-2 index writes format 3 too."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.lock import WriterLock
from search.errors import IndexFormatError
from search.query import Filters
from search.store import open_index

from .helpers import make_pairs, write_images, write_karpathy

ROOT = str(Path(__file__).resolve().parents[1])
V2_IMAGE_COLUMNS = ["id", "path", "width", "height", "size", "mtime_ns", "sha1"]  # the previous program's schema
DATED = int(datetime(2018, 5, 6, 7, 8, 9, tzinfo=timezone.utc).timestamp())
MTIME = 1_400_000_000


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "indexer", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})


def to_version_2(index: Path) -> None:
    """What the previous program wrote: no split/taken columns, no filter or keyword indexes, format_version 2."""
    with sqlite3.connect(index / "catalog.sqlite") as db:
        db.executescript("DROP TABLE image_words; DROP TABLE caption_words; DROP INDEX images_by_split; "
                         "DROP INDEX images_by_taken; ALTER TABLE images DROP COLUMN split; "
                         "ALTER TABLE images DROP COLUMN taken; DROP TABLE sqlite_stat1; PRAGMA user_version = 0;")
        assert [row[1] for row in db.execute("PRAGMA table_info(images)")] == V2_IMAGE_COLUMNS
        assert {row[0] for row in db.execute("SELECT name FROM sqlite_master")} == {
            "images", "captions", "captions_by_image", "sqlite_autoindex_images_1"}
    db.close()
    manifest = json.loads((index / "manifest.json").read_text())
    for key in ("relevance", "near_duplicates"):
        manifest.pop(key, None)
    manifest["format_version"] = 2
    (index / "manifest.json").write_text(json.dumps(manifest, indent=2))


def snapshot(index: Path) -> dict:
    """Bytes of every file but the catalog and manifest; the catalog's rows; search answers."""
    files = {p.name: p.read_bytes() for p in sorted(index.iterdir()) if p.name not in ("catalog.sqlite",
                                                                                         "manifest.json")}
    stored = open_index(index)
    with sqlite3.connect(index / "catalog.sqlite") as db:
        rows = db.execute(f"SELECT {', '.join(V2_IMAGE_COLUMNS)} FROM images ORDER BY id").fetchall()
        captions = db.execute("SELECT * FROM captions ORDER BY id").fetchall()
    db.close()
    queries = np.asarray(stored.caption_vectors[:6], np.float32)
    return {"files": files, "rows": rows, "captions": captions, "images": stored.images.search(queries, 4),
            "captions_search": stored.captions.search(np.asarray(stored.image_vectors[:3], np.float32), 4)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_spec):
    """A format-3 index built by the CLI: six generated images (fixed mtime) and a JPEG with an EXIF date."""
    work = tmp_path_factory.mktemp("migrate")
    pairs = make_pairs(6, seed=9)
    photos = write_images(work / "photos", pairs)
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2018:05:06 07:08:09"
    Image.new("RGB", (50, 40), (20, 160, 90)).save(photos / "dated.jpg", "JPEG", exif=exif)
    for name, *_ in pairs:
        os.utime(photos / name, (MTIME, MTIME))
    entries = pairs + [("dated.jpg", ("a photo of a meadow at dawn",), None)]
    write_karpathy(work / "split.json", entries, ["train", "val", "test", "train", "val", "test", "restval"])
    done = run("build", "--format", "karpathy", "--annotations", "split.json", "--images", "photos", "--out",
               "fresh", "--model", tiny_model_spec, "--quiet", cwd=work)
    assert done.returncode == 0, done.stderr
    return work


def version_2_copy(built: Path, name: str) -> Path:
    index = built / name
    shutil.copytree(built / "fresh", index)
    to_version_2(index)
    return index


def test_a_version_2_index_answers_plain_searches_and_names_the_migration(built):
    index = version_2_copy(built, "old_plain")
    stored = open_index(index)
    assert stored.manifest.format_version == 2 and stored.catalog.version == 2
    assert stored.images.search(np.asarray(stored.caption_vectors[:1], np.float32), 3)[1].shape == (1, 3)
    for call in (lambda: stored.catalog.keyword_images("beach", 5),
                 lambda: stored.catalog.keyword_captions("beach", 5),
                 lambda: stored.catalog.filter_ids(Filters(taken_after=0))):
        with pytest.raises(IndexFormatError, match=f"run: python -m indexer migrate --index {index}$"):
            call()


def test_migrate_upgrades_in_place_with_vectors_untouched(built):
    index = version_2_copy(built, "old")
    before = snapshot(index)
    done = run("migrate", "--index", "old", cwd=built)  # relative, from the index's folder
    assert done.returncode == 0, done.stderr
    assert "migrated old from index format 2 to 3" in done.stdout and "1 EXIF, 6 file time, 0 unknown" in done.stdout
    after = snapshot(index)
    assert after["files"].keys() == before["files"].keys() and all(
        after["files"][name] == data for name, data in before["files"].items())  # vectors, FAISS files
    assert after["rows"] == before["rows"] and after["captions"] == before["captions"]
    for kind in ("images", "captions_search"):
        np.testing.assert_array_equal(after[kind][1], before[kind][1])
        np.testing.assert_array_equal(after[kind][0], before[kind][0])
    stored = open_index(index)
    assert stored.manifest.format_version == 3 and stored.catalog.version == 3
    fresh = {r.path: r for r in open_index(built / "fresh").catalog.all_images()}
    migrated = {r.path: r for r in stored.catalog.all_images()}
    assert {p: r.taken for p, r in migrated.items()} == {p: r.taken for p, r in fresh.items()}  # as a build dates
    assert migrated["dated.jpg"].taken == DATED and {r.taken for p, r in migrated.items() if p != "dated.jpg"} == {
        MTIME}
    assert all(r.split is None for r in migrated.values())  # a migration reads no dataset
    dated = migrated["dated.jpg"].id
    assert [hit[0] for hit in stored.catalog.keyword_images("meadow dawn", 5)] == [dated]
    assert list(stored.catalog.filter_ids(Filters(taken_after=DATED))) == [dated]
    assert not list(built.glob(".old.*partial*"))

    again = run("migrate", "--index", "old", cwd=built)
    assert again.returncode == 0 and "already in index format 3" in again.stdout


def test_without_the_image_folder_the_dates_stay_unknown(built, tmp_path):
    index = version_2_copy(built, "old_elsewhere")
    moved = tmp_path / "moved"
    shutil.move(str(index), moved)
    done = run("migrate", "--index", str(moved), cwd=tmp_path)  # the recorded folder is there: dated from it
    assert done.returncode == 0, done.stderr
    assert all(r.taken is not None for r in open_index(moved).catalog.all_images())
    shutil.rmtree(moved)
    shutil.copytree(built / "fresh", moved)
    to_version_2(moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["images"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    done = run("migrate", "--index", "moved", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "0 EXIF, 0 file time, 7 unknown" in done.stdout
    catalog = open_index(moved).catalog
    assert catalog.version == 3 and all(r.taken is None for r in catalog.all_images())
    assert catalog.keyword_images("meadow", 3)


def test_migrate_refuses_bad_input_and_a_busy_index(built, tmp_path):
    index = version_2_copy(built, "old_busy")
    for args, message in ((("--index", str(tmp_path / "nothing")), "no such index directory"),
                          (("--index", str(index), "--images", str(tmp_path / "nowhere")), "image folder not found")):
        done = run("migrate", *args, cwd=tmp_path)
        assert done.returncode == 1 and done.stderr.startswith("error: ") and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    with WriterLock(index):
        done = run("migrate", "--index", str(index), cwd=tmp_path)
    assert done.returncode == 1 and "is being written by" in done.stderr
    assert json.loads((index / "manifest.json").read_text())["format_version"] == 2  # untouched


def test_update_of_a_version_2_index_writes_version_3(built):
    index = version_2_copy(built, "old_update")
    before = snapshot(index)
    done = run("update", "--index", "old_update", "--quiet", cwd=built)
    assert done.returncode == 0, done.stderr
    stored = open_index(index)
    assert stored.manifest.format_version == 3 and stored.catalog.version == 3
    assert snapshot(index)["rows"] == before["rows"]  # every image kept as it was
    fresh = open_index(built / "fresh").catalog.all_images()
    assert [(r.split, r.taken) for r in stored.catalog.all_images()] == [(r.split, r.taken) for r in fresh]
    assert stored.catalog.keyword_images("meadow", 3)[0][0] == fresh[-1].id
