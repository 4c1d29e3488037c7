"""Filters (issue 13 item 3): the catalog's filter_ids against Python over the catalog rows, dates from EXIF and mtime,
splits from the datasets, and vector search restricted to allowed ids against numpy brute force (Flat, IVF, HNSW,
on-disk), always k results when k are allowed."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from indexer.embedding_stream import NpyFile
from indexer.loader import exif_taken
from indexer.ondisk_index_build import Budget, fill_shards, merge_shards, trained_index
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import read_dataset
from search import vector_index
from search.catalog import Catalog, CatalogWriter, FileInfo
from search.errors import IndexFormatError
from search.ondisk_index import OnDiskIndex
from search.query import Filters
from search.store import open_index
from search.vector_index import VectorIndex

from .helpers import make_pairs, write_flickr8k, write_images, write_karpathy

ROOT = str(Path(__file__).resolve().parents[1])
PATHS = ["holiday/2019/beach_1.jpg", "holiday/2019/beach_2.jpg", "holiday/2020/snow.jpg", "holidays/x.png",
         "100%_real/a.jpg", "100_real/b.jpg", "1000/c.jpg", "a_b/c.jpg", "axb/c.jpg", "Ünïcode/ß.jpg",
         "Ünïcode/ß2.jpg", "top.jpg", "deep/er/still/file.webp", "holiday/2019 copy.jpg"]
SPLITS = ["train", "val", "test", None]


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    """A catalog of awkward paths (LIKE wildcards, Unicode) with random sizes, splits and dates (some unknown)."""
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("catalog") / "catalog.sqlite"
    writer = CatalogWriter(path)
    names = PATHS + [f"bulk/{rng.choice('abc')}/{i:04d}.jpg" for i in range(300)]
    for name in names:
        taken = None if rng.random() < 0.1 else rng.randrange(-10**9, 2 * 10**9)
        writer.add(name, rng.randrange(1, 4000), rng.randrange(1, 4000), [f"caption of {name}"],
                   FileInfo(1, 1, "x", taken), rng.choice(SPLITS))
    writer.close()
    return Catalog(path)


def python_filter(records, filters: Filters) -> list[int]:
    """The oracle: the conditions evaluated in Python over every catalog row."""
    def keep(r) -> bool:
        return ((filters.path_prefix is None or r.path.startswith(filters.path_prefix))
                and (filters.split is None or r.split == filters.split)
                and (filters.min_width is None or r.width >= filters.min_width)
                and (filters.max_width is None or r.width <= filters.max_width)
                and (filters.min_height is None or r.height >= filters.min_height)
                and (filters.max_height is None or r.height <= filters.max_height)
                and (filters.taken_after is None or (r.taken is not None and r.taken >= filters.taken_after))
                and (filters.taken_before is None or (r.taken is not None and r.taken <= filters.taken_before)))
    return [r.id for r in records if keep(r)]


@pytest.mark.parametrize("prefix", ["holiday/", "holiday", "holiday/2019/", "100%", "100%_", "100_", "a_b", "a%",
                                    "_", "%", "Ünïcode/", "Ünïcode/ß", "holiday/2019 ", "bulk/b/", "zzz",
                                    "top.jpg"])
def test_a_path_prefix_is_literal(catalog, prefix):
    ids = catalog.filter_ids(Filters(path_prefix=prefix))
    assert ids.dtype == np.int64 and list(ids) == sorted(ids)
    assert list(ids) == python_filter(catalog.all_images(), Filters(path_prefix=prefix))


def test_random_filter_combinations_equal_python_over_the_rows(catalog):
    records = catalog.all_images()
    rng = random.Random(5)
    prefixes = [None, "bulk/", "bulk/a/", "holiday", "Ünïcode/"]
    nonempty = 0
    for _ in range(200):
        low, high = sorted(rng.randrange(-10**9, 2 * 10**9) for _ in range(2))
        filters = Filters(path_prefix=rng.choice(prefixes), split=rng.choice(SPLITS + [None, None]),
                          min_width=rng.choice([None, rng.randrange(4000)]),
                          max_width=rng.choice([None, rng.randrange(4000)]),
                          min_height=rng.choice([None, rng.randrange(4000)]),
                          max_height=rng.choice([None, rng.randrange(4000)]),
                          taken_after=rng.choice([None, low, low + 0.5]), taken_before=rng.choice([None, high]))
        expected = python_filter(records, filters)
        assert list(catalog.filter_ids(filters)) == expected, filters
        nonempty += bool(expected)
    assert nonempty > 50  # the combinations are not all empty
    assert list(catalog.filter_ids(Filters())) == [r.id for r in records]


def test_taken_answers_dates_for_sorting(catalog):
    records = catalog.all_images()
    ids = [r.id for r in records[::7]]
    assert catalog.taken(ids) == {r.id: r.taken for r in records[::7]}
    assert any(v is None for v in catalog.taken(range(len(records))).values())


def jpeg_with_date(path: Path, when: str, offset: str | None, size=(64, 48), orientation: int = 1) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    ifd = exif.get_ifd(0x8769)
    ifd[0x9003] = when
    if offset:
        ifd[0x9011] = offset
    Image.new("RGB", size, (200, 40, 40)).save(path, "JPEG", exif=exif)


@pytest.mark.parametrize("when,offset,expected", [
    ("2019:07:04 10:11:12", "+02:00", datetime(2019, 7, 4, 8, 11, 12, tzinfo=timezone.utc)),
    ("2019:07:04 10:11:12", "-05:30", datetime(2019, 7, 4, 15, 41, 12, tzinfo=timezone.utc)),
    ("2019:07:04 10:11:12", None, datetime(2019, 7, 4, 10, 11, 12, tzinfo=timezone.utc)),  # no zone: read as UTC
    ("1969:12:31 23:59:00", None, datetime(1969, 12, 31, 23, 59, tzinfo=timezone.utc)),
    ("0000:00:00 00:00:00", None, None),  # what cameras write when the clock was never set
])
def test_exif_dates(tmp_path, when, offset, expected):
    jpeg_with_date(tmp_path / "p.jpg", when, offset, orientation=6)
    with Image.open(tmp_path / "p.jpg") as image:
        assert exif_taken(image) == (None if expected is None else int(expected.timestamp()))


def test_a_build_records_splits_and_dates(tmp_path, tiny_encoder):
    """Karpathy splits (all of them read), EXIF dates where the file has one, else its mtime."""
    pairs = make_pairs(6, seed=4)
    photos = write_images(tmp_path / "photos", pairs)
    jpeg_with_date(photos / "dated.jpg", "2021:03:04 05:06:07", "+01:00")
    mtime = 1_500_000_000
    for name, *_ in pairs:
        os.utime(photos / name, ns=(mtime * 10**9 + 123, mtime * 10**9 + 123))
    entries = pairs + [("dated.jpg", ("a dated photo",), None)]
    splits = ["train", "train", "val", "test", "restval", "val", "test"]
    annotations = write_karpathy(tmp_path / "karpathy.json", entries, splits)
    samples = read_dataset("karpathy", annotations, photos)
    assert [s.split for s in samples] == splits
    build_index(samples, photos, tiny_encoder, tmp_path / "index", BuildConfig(batch_size=3, progress=False))
    catalog = open_index(tmp_path / "index").catalog
    records = {r.path: r for r in catalog.all_images()}
    assert {path: r.split for path, r in records.items()} == {name: s for (name, *_), s in zip(entries, splits)}
    assert records["dated.jpg"].taken == int(datetime(2021, 3, 4, 4, 6, 7, tzinfo=timezone.utc).timestamp())
    assert all(records[name].taken == mtime for name, *_ in pairs)
    assert list(catalog.filter_ids(Filters(split="val"))) == [i for i, s in enumerate(splits) if s == "val"]
    after = datetime(2021, 1, 1, tzinfo=timezone.utc).timestamp()
    assert list(catalog.filter_ids(Filters(taken_after=after))) == [records["dated.jpg"].id]


def test_flickr8k_samples_carry_their_split_list(tmp_path):
    pairs = make_pairs(5, seed=1)
    token = write_flickr8k(tmp_path, pairs, ["train", "dev", "test", "train", "other"])
    every = read_dataset("flickr8k", token, tmp_path)
    assert [s.split for s in every] == ["train", "val", "test", "train", None]
    assert [(s.image, s.split) for s in read_dataset("flickr8k", token, tmp_path, "dev")] == [(pairs[1][0], "val")]


def test_cli_build_from_another_directory_filters_by_split_and_folder(tmp_path, tiny_model_spec):
    """The user's way: `python -m indexer build` run elsewhere with relative paths, then the catalog filters."""
    pairs = make_pairs(8, seed=6)
    write_images(tmp_path / "data" / "images", pairs[:4], "beach")
    write_images(tmp_path / "data" / "images", pairs[4:], "snow")
    entries = [(f"{'beach' if i < 4 else 'snow'}/{name}", caps, spec) for i, (name, caps, spec) in enumerate(pairs)]
    splits = ["train", "test"] * 4
    write_karpathy(tmp_path / "data" / "split.json", entries, splits)
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "karpathy", "--annotations",
                           "../data/split.json", "--images", "../data/images", "--out", "idx", "--model",
                           tiny_model_spec, "--quiet"], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    catalog = open_index(work / "idx").catalog
    records = catalog.all_images()
    assert [r.path for r in records] == [e[0] for e in entries]
    for filters in (Filters(split="test"), Filters(path_prefix="snow/"), Filters(path_prefix="snow/", split="train"),
                    Filters(min_width=48, max_height=48)):
        assert list(catalog.filter_ids(filters)) == python_filter(records, filters)
    assert all(r.taken is not None for r in records)


def test_a_version_2_catalog_refuses_split_and_date_filters_with_the_migrate_command(tmp_path):
    import sqlite3

    path = tmp_path / "index" / "catalog.sqlite"
    path.parent.mkdir()
    with sqlite3.connect(path) as db:  # the previous program's schema
        db.executescript("CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, width INTEGER, "
                         "height INTEGER, size INTEGER, mtime_ns INTEGER, sha1 TEXT); CREATE TABLE captions (id "
                         "INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id), text TEXT NOT NULL);"
                         "INSERT INTO images VALUES (0, 'a/x.jpg', 5, 5, 1, 1, 'h'), (1, 'b/y.jpg', 9, 9, 1, 1, 'h');")
    catalog = Catalog(path)
    assert catalog.version == 2 and catalog.all_images()[0].taken is None
    assert list(catalog.filter_ids(Filters(path_prefix="b/", min_width=6))) == [1]  # needs nothing new
    for call in (lambda: catalog.filter_ids(Filters(split="val")),
                 lambda: catalog.filter_ids(Filters(taken_after=0)), lambda: catalog.taken([0])):
        with pytest.raises(IndexFormatError, match=r"run: python -m indexer migrate --index .*index"):
            call()


# -- vector search restricted to allowed ids ------------------------------------------------------------------------

def brute_force(vectors, queries, allowed, k):
    scores = queries @ vectors[allowed].T
    return np.sort(scores, axis=1)[:, ::-1][:, :k]


def check_against_brute_force(index, vectors, queries, allowed, k):
    scores, ids = index.search(queries, k, allowed=allowed)
    expected = brute_force(vectors, queries, allowed, k)
    assert ids.shape == (len(queries), min(k, len(allowed)))
    assert (ids >= 0).all() and np.isin(ids, allowed).all()
    assert all(len(set(row)) == len(row) for row in ids)
    exact = np.einsum("qd,qkd->qk", queries, vectors[ids])  # each returned score is its id's true score
    np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-5)
    return scores, expected


def allowed_sets(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"one": np.array([n // 2]), "few": np.sort(rng.choice(n, 7, replace=False)),
            "1%": np.sort(rng.choice(n, n // 100, replace=False)), "half": np.arange(0, n, 2),
            "everything": np.arange(n)}


@pytest.mark.parametrize("exact_max", [vector_index.EXACT_MAX_FLOATS, 0])  # 0: always through FAISS's selector
@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "HNSW16"])
def test_restricted_vector_search_equals_brute_force(monkeypatch, factory, exact_max):
    monkeypatch.setattr(vector_index, "EXACT_MAX_FLOATS", exact_max)
    vectors, queries = unit(6000, 16, 0), unit(12, 16, 1)
    index = VectorIndex.build(vectors, factory)
    index.vectors = vectors
    if factory.startswith("IVF"):
        index.set_params({"nprobe": 1})  # one list of 64: a selective filter finds too few there at first
    for name, allowed in allowed_sets(len(vectors)).items():
        for k in (1, 10, 50):
            scores, expected = check_against_brute_force(index, vectors, queries, allowed, k)
            if factory == "Flat" or exact_max:  # exact: Flat, or 6,000 16-d rows at most are scored with numpy
                np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    if factory.startswith("IVF"):  # probing every list, the selector path is exact too
        index.set_params({"nprobe": 64})
        for allowed in allowed_sets(len(vectors), seed=1).values():
            scores, expected = check_against_brute_force(index, vectors, queries, allowed, 10)
            np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_an_ivf_widens_its_probes_until_k_allowed_ids_are_found(monkeypatch):
    monkeypatch.setattr(vector_index, "EXACT_MAX_FLOATS", 0)
    vectors, queries = unit(6000, 16, 2), unit(5, 16, 3)
    index = VectorIndex.build(vectors, "IVF64,Flat")
    index.set_params({"nprobe": 1})
    allowed = np.sort(np.random.default_rng(4).choice(len(vectors), 40, replace=False))
    params = faiss.SearchParametersIVF(sel=vector_index.IdSelector(allowed, len(vectors)).selector, nprobe=1)
    assert (index.index.search(queries, 20, params=params)[1] < 0).any()  # the tuned probes alone fall short
    scores, ids = index.search(queries, 20, allowed=allowed)
    assert (ids >= 0).all() and np.isin(ids, allowed).all()
    assert index.params == {"nprobe": 1} and faiss.extract_index_ivf(index.index).nprobe == 1  # untouched


def test_allowed_ids_out_of_range_or_none_left(monkeypatch):
    vectors = unit(100, 8, 5)
    index = VectorIndex.build(vectors, "Flat")
    scores, ids = index.search(vectors[:2], 5, allowed=np.array([], np.int64))
    assert ids.shape == (2, 0)
    scores, ids = index.search(vectors[:2], 5, allowed=np.array([3, 3, 500, -1, 7]))
    assert ids.shape == (2, 2) and set(ids[0]) == {3, 7}


def build_on_disk_ivf(tmp_path, vectors, factory):
    np.save(tmp_path / "raw.npy", vectors)
    raw = NpyFile.open(tmp_path / "raw.npy")
    trained = trained_index(raw, factory, "ip", Budget(1 << 22))
    shards = fill_shards(trained, raw, tmp_path / "shards", Budget(1 << 22), shard_rows=2000)
    merge_shards(trained, shards, tmp_path / "merged.faiss", tmp_path / "merged.ivfdata")
    return tmp_path / "merged.faiss"


@pytest.fixture(scope="module")
def on_disk_ivf(tmp_path_factory):
    vectors = unit(6000, 16, 6)
    return vectors, build_on_disk_ivf(tmp_path_factory.mktemp("ondisk"), vectors, "IVF32,PQ4x4")


@pytest.mark.parametrize("exact_max", [vector_index.EXACT_MAX_FLOATS, 0])
def test_restricted_on_disk_search_equals_brute_force(on_disk_ivf, monkeypatch, exact_max):
    import search.ondisk_index as ondisk

    monkeypatch.setattr(ondisk, "EXACT_MAX_FLOATS", exact_max)
    vectors, path = on_disk_ivf
    queries = unit(10, 16, 7)
    stored = vectors.astype(np.float16)
    index = OnDiskIndex.load(path, stored, "IVF32,PQ4x4", "ip", {"nprobe": 1, "refine": 2})
    as_read = stored.astype(np.float32)
    for name, allowed in allowed_sets(len(vectors), seed=8).items():
        for k in (1, 10, 30):
            scores, expected = check_against_brute_force(index, as_read, queries, allowed, k)
            if exact_max or len(allowed) <= k * 2:  # exact scoring, or every allowed id a candidate (k × refine)
                np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_an_index_from_embeddings_has_dates_only_when_given_the_images(tmp_path, tiny_encoder):
    from indexer.embedding_folder import export_embeddings
    from indexer.from_embeddings import build_from_embeddings

    pairs = make_pairs(5, seed=7)
    photos = write_images(tmp_path / "photos", pairs)
    jpeg_with_date(photos / "dated.jpg", "2022:02:02 02:02:02", None)
    samples = read_dataset("folder", None, photos)
    build_index(samples, photos, tiny_encoder, tmp_path / "index", BuildConfig(progress=False))
    export_embeddings(tmp_path / "index", tmp_path / "embeddings")
    build_from_embeddings(tmp_path / "embeddings", tmp_path / "bare", tiny_encoder)
    build_from_embeddings(tmp_path / "embeddings", tmp_path / "with_images", tiny_encoder, images_root=photos)
    original = {r.path: r.taken for r in open_index(tmp_path / "index").catalog.all_images()}
    assert original["dated.jpg"] == int(datetime(2022, 2, 2, 2, 2, 2, tzinfo=timezone.utc).timestamp())
    bare = open_index(tmp_path / "bare").catalog
    assert all(r.taken is None and r.split is None for r in bare.all_images())
    assert bare.keyword_images("dated", 3)  # the keyword index over file names is there all the same
    assert {r.path: r.taken for r in open_index(tmp_path / "with_images").catalog.all_images()} == original
