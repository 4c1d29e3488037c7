"""On-disk indexes (issue 12 item 3): shards merged with merge_ondisk answer as one in-memory IVF, exact re-ranking
equals numpy brute force, the build streams an embedding folder and replaces an index atomically."""
from __future__ import annotations

import json
import subprocess
import sys

import faiss
import numpy as np
import pytest

from indexer.embedding_stream import NpyFile
from indexer.ondisk_build import OnDiskOptions, build_on_disk
from indexer.ondisk_index_build import Budget, fill_shards, merge_shards, trained_index, training_sample
from indexer.verify import verify
from search.errors import DatasetError
from search.ondisk_index import OnDiskIndex
from search.store import open_index

from .helpers import build_flickr8k_index

def clustered(n: int, d: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """Unit vectors around `clusters` random centres (how CLIP embeddings cluster)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def on_disk(tmp_path, vectors: np.ndarray, factory: str, shard_rows: int) -> tuple[np.ndarray, str]:
    """(the trained index before any vector was added, serialised; the path of the merged on-disk .faiss)"""
    np.save(tmp_path / "raw.npy", vectors)
    raw = NpyFile.open(tmp_path / "raw.npy")
    trained = trained_index(raw, factory, "ip", Budget(1 << 22))
    pristine = faiss.serialize_index(trained)
    shards = fill_shards(trained, raw, tmp_path / "shards", Budget(1 << 22), shard_rows=shard_rows)
    assert len(shards) >= 3
    merge_shards(trained, shards, tmp_path / "merged.faiss", tmp_path / "merged.ivfdata")
    return pristine, str(tmp_path / "merged.faiss")


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "IVF16,Flat"])
def test_merged_on_disk_ivf_answers_exactly_as_one_in_memory_ivf(tmp_path, factory):
    vectors = clustered(3000, 32)
    pristine, merged_path = on_disk(tmp_path, vectors, factory, shard_rows=700)
    merged = faiss.read_index(merged_path, faiss.IO_FLAG_ONDISK_SAME_DIR)
    memory = faiss.deserialize_index(pristine)
    memory.add(vectors)  # ids 0..n-1 in order: the shards' global ids must land on the same ones
    queries = clustered(50, 32, seed=1)
    for nprobe in (1, 4, 16):
        for index in (merged, memory):
            faiss.extract_index_ivf(index).nprobe = nprobe
        expected, got = memory.search(queries, 20), merged.search(queries, 20)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
    assert merged.ntotal == memory.ntotal == len(vectors)


def test_reranking_equals_numpy_brute_force(tmp_path):
    vectors = clustered(3000, 32)
    _, merged_path = on_disk(tmp_path, vectors, "IVF16,PQ8", shard_rows=1000)
    stored = vectors.astype(np.float16)  # as an on-disk index keeps a float16 folder's vectors
    index = OnDiskIndex.load(merged_path, stored, "IVF16,PQ8", "ip", {"nprobe": 4, "refine": 3})
    queries = clustered(40, 32, seed=2)
    scores, ids = index.search(queries, 10)
    for query, found, got_scores, candidates in zip(queries, ids, scores, index.candidates(queries, 10)):
        assert len(candidates) == 30
        exact = stored[candidates].astype(np.float32) @ query
        best = candidates[np.argsort(-exact, kind="stable")[:10]]
        np.testing.assert_array_equal(found, best)
        np.testing.assert_allclose(got_scores, np.sort(exact)[::-1][:10], rtol=1e-5)

    flat_dir = tmp_path / "flat"
    flat_dir.mkdir()
    _, flat_path = on_disk(flat_dir, vectors, "IVF16,Flat", shard_rows=1000)
    index = OnDiskIndex.load(flat_path, stored, "IVF16,Flat", "ip", {"nprobe": 16, "refine": 1})
    scores, ids = index.search(queries, 10)
    everything = queries @ stored.astype(np.float32).T
    np.testing.assert_array_equal(ids, np.argsort(-everything, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, -np.sort(-everything, axis=1)[:, :10], rtol=1e-5)


def write_folder(folder, parts: list[np.ndarray], captions: bool = False) -> None:
    """A clip-retrieval-style embedding folder: float16 files, one row per image (paths unique across files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("img_emb", "metadata") + (("text_emb",) if captions else ()):
        (folder / name).mkdir(parents=True, exist_ok=True)
    start = 0
    for number, part in enumerate(parts):
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", part.astype(np.float16))
        paths = [f"img/{start + i:06d}.jpg" for i in range(len(part))]
        pq.write_table(pa.table({"image_path": paths}), folder / "metadata" / f"metadata_{number}.parquet")
        start += len(part)


def test_build_streams_a_multi_file_folder_and_samples_every_file(tmp_path, tiny_encoder):
    parts = [clustered(2000, tiny_encoder.dim, seed=s) * 3 for s in range(3)]  # not unit length: re-normalised
    write_folder(tmp_path / "emb", parts)
    manifest = build_on_disk(tmp_path / "emb", tmp_path / "index", tiny_encoder,
                             options=OnDiskOptions(memory_budget=1 << 22, shard_rows=1500))
    entry = manifest.indexes["images"]
    assert entry["on_disk"] and entry["params"]["nprobe"] >= 1 and entry["recall_at_10"] >= 0.9
    index = open_index(tmp_path / "index")
    assert isinstance(index.images, OnDiskIndex) and index.image_vectors.dtype == np.float16
    expected = np.concatenate(parts).astype(np.float16).astype(np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(index.image_vectors, np.float32), expected, atol=1e-3)
    assert [r.path for r in index.catalog.all_images()][1999:2001] == ["img/001999.jpg", "img/002000.jpg"]

    raw = NpyFile.open(tmp_path / "index" / "image_vectors.npy")
    budget = Budget(1 << 20)  # the sample it allows (2048 rows) is a third of the vectors
    sample = training_sample(raw, 16, budget)
    assert len(sample) == budget.sample_rows(raw.dim) < raw.rows
    rows = {tuple(v) for v in sample.astype(np.float16)}
    per_file = [sum(tuple(v) in rows for v in index.image_vectors[i * 2000:(i + 1) * 2000]) for i in range(3)]
    assert all(count > 200 for count in per_file), per_file  # uniform over all files, not the first rows

    report = verify(tmp_path / "index", use_model=False)
    assert report.failures == 0, report.checks
    scores, ids = index.images.search(np.asarray(index.image_vectors[:5], np.float32), 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))  # every stored vector finds itself


def test_a_failed_build_leaves_the_previous_index_untouched(tmp_path, tiny_encoder, monkeypatch):
    write_folder(tmp_path / "emb", [clustered(1500, tiny_encoder.dim)])
    build_on_disk(tmp_path / "emb", tmp_path / "index", tiny_encoder, options=OnDiskOptions(shard_rows=500))
    before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr("indexer.ondisk_build.merge_shards", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_on_disk(tmp_path / "emb", tmp_path / "index", tiny_encoder, options=OnDiskOptions(shard_rows=500),
                      overwrite=True)
    monkeypatch.undo()

    scattered = tmp_path / "scattered"  # image 0's rows apart: refused with the path, nothing replaced
    write_folder(scattered, [clustered(10, tiny_encoder.dim)])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"image_path": [f"img/{i % 5}.jpg" for i in range(10)]}),
                   scattered / "metadata" / "metadata_0.parquet")
    with pytest.raises(DatasetError, match="not consecutive"):
        build_on_disk(scattered, tmp_path / "index", tiny_encoder, overwrite=True)

    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index.partial")] == []
    assert open_index(tmp_path / "index").images.ntotal == 1500


@pytest.fixture(scope="module")
def captioned_index(tmp_path_factory, tiny_model_spec):
    return build_flickr8k_index(tmp_path_factory.mktemp("ondisk"), tiny_model_spec)


def _run(work, *command: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *command], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def _query(work, index: str, *extra: str) -> list:
    done = _run(work, "search", "query", "--index", index, "--json", "-k", "5", *extra)
    return [(h.get("caption"), h["image"]) for h in json.loads(done.stdout)["results"]]


def test_cli_on_disk_build_from_an_export_answers_as_the_original(captioned_index):
    work = captioned_index
    _run(work, "indexer", "export", "--index", "index", "--out", "emb", "--rows-per-file", "10")
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    done = _run(elsewhere, "indexer", "build", "--format", "embeddings", "--embeddings", "../emb", "--images",
                "../images", "--out", "../on_disk", "--on-disk", "--memory-budget", "64MB", "--quiet")
    assert "on disk" in done.stdout
    built = open_index(work / "on_disk")
    assert isinstance(built.images, OnDiskIndex) and isinstance(built.captions, OnDiskIndex)
    assert (work / "on_disk" / "images.ivfdata").is_file() and not (work / ".on_disk.partial").exists()
    for query in (["--text", "a red circle"], ["--text", "green bar", "--target", "captions"]):
        assert _query(work, "on_disk", *query) == _query(work, "index", *query)

    details = json.loads(_run(work, "indexer", "info", "--index", "on_disk", "--json").stdout)
    assert details["indexes"]["images"]["on_disk"] and "refine" in details["indexes"]["images"]["params"]
    assert "all" in _run(work, "indexer", "verify", "--index", "on_disk", "--no-model").stdout
    evaluated = json.loads(_run(work, "search", "eval", "--index", "on_disk", "--json").stdout)
    original = json.loads(_run(work, "search", "eval", "--index", "index", "--json").stdout)
    assert evaluated["text_to_image"] == original["text_to_image"]
    _run(work, "indexer", "export", "--index", "on_disk", "--out", "again")
    assert json.loads((work / "again" / "embeddings.json").read_text())["rows"] == 27


@pytest.mark.slow
def test_shards_filled_as_ray_tasks_give_the_local_index(tmp_path, tiny_encoder):
    ray = pytest.importorskip("ray")
    write_folder(tmp_path / "emb", [clustered(6000, tiny_encoder.dim, seed=s) for s in range(2)])
    local = build_on_disk(tmp_path / "emb", tmp_path / "local", tiny_encoder, options=OnDiskOptions(shard_rows=5000))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        on_ray = build_on_disk(tmp_path / "emb", tmp_path / "ray", tiny_encoder, options=OnDiskOptions(engine="ray"))
    finally:
        if started:
            ray.shutdown()
    def chosen(manifest):  # memory_bytes: the .faiss file, which names its .ivfdata path (another work dir here)
        return {kind: {k: v for k, v in entry.items() if k != "memory_bytes"} for kind, entry in manifest.indexes.items()}
    assert chosen(on_ray) == chosen(local) and on_ray.image_factory == local.image_factory
    a, b = open_index(tmp_path / "local"), open_index(tmp_path / "ray")
    queries = clustered(30, tiny_encoder.dim, seed=9)
    for index in (a, b):
        index.images.set_params({"nprobe": 2})
    np.testing.assert_array_equal(a.images.search(queries, 10)[1], b.images.search(queries, 10)[1])
    assert (tmp_path / "local" / "images.ivfdata").read_bytes() == (tmp_path / "ray" / "images.ivfdata").read_bytes()
