"""`indexer export`: an index's vectors as a LAION-layout embedding folder, read back by embedding-reader (the
reader clip-retrieval's autofaiss and index steps use) as the oracle."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from search.store import open_index

from .helpers import build_flickr8k_index


@pytest.fixture(scope="module")
def captioned_index(tmp_path_factory, tiny_model_spec):
    return build_flickr8k_index(tmp_path_factory.mktemp("export"), tiny_model_spec)


def test_export_is_read_back_by_embedding_reader_row_for_row(captioned_index):
    reader_module = pytest.importorskip("embedding_reader")
    work = captioned_index
    done = subprocess.run([sys.executable, "-m", "indexer", "export", "--index", "index", "--out", "emb",
                           "--rows-per-file", "10"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    index = open_index(work / "index")
    links = index.catalog.caption_links()
    assert len(links) == 27 and "wrote 27 rows" in done.stdout and "3 file(s)" in done.stdout
    description = json.loads((work / "emb" / "embeddings.json").read_text())
    assert description["fingerprint"] == index.manifest.fingerprint and description["rows"] == 27

    columns = ["image_path", "caption", "image_id", "caption_id"]
    images = reader_module.EmbeddingReader(str(work / "emb" / "img_emb"), file_format="parquet_npy",
                                           meta_columns=columns, metadata_folder=str(work / "emb" / "metadata"))
    texts = reader_module.EmbeddingReader(str(work / "emb" / "text_emb"), file_format="parquet_npy",
                                          meta_columns=columns, metadata_folder=str(work / "emb" / "metadata"))
    assert images.count == texts.count == 27 and images.dimension == index.manifest.dim
    (image_vectors, meta), = images(batch_size=100, start=0, end=27, show_progress=False)
    (text_vectors, _), = texts(batch_size=100, start=0, end=27, show_progress=False)
    records = {r.id: r.path for r in index.catalog.all_images()}
    captions = index.catalog.captions([c for c, _ in links])
    for row, (caption_id, image_id) in enumerate(links):
        assert meta["caption_id"][row] == caption_id and meta["image_id"][row] == image_id
        assert meta["image_path"][row] == records[image_id] and meta["caption"][row] == captions[caption_id].text
    np.testing.assert_array_equal(image_vectors, index.image_vectors[[i for _, i in links]])
    np.testing.assert_array_equal(text_vectors, index.caption_vectors[[c for c, _ in links]])


def test_export_refuses_to_replace_what_is_not_an_embedding_folder(captioned_index):
    work = captioned_index
    (work / "precious").mkdir(exist_ok=True)
    (work / "precious" / "notes.txt").write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "indexer", "export", "--index", "index", "--out", "precious",
                           "--overwrite"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "not an embedding folder" in done.stderr
    assert (work / "precious" / "notes.txt").read_text() == "keep me"


def _query(work, index: str, *extra: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "search", "query", "--index", index, "--json", "-k", "5", *extra],
                          cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [(h.get("caption"), h["image"]) for h in json.loads(done.stdout)["results"]]


def test_round_trip_export_then_build_from_embeddings_answers_the_same(captioned_index):
    work = captioned_index
    subprocess.run([sys.executable, "-m", "indexer", "export", "--index", "index", "--out", "trip", "--overwrite"],
                   cwd=work, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "embeddings", "--embeddings", "trip",
                           "--images", "images", "--out", "rebuilt"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0 and "no encoding" in done.stdout, done.stderr
    before, after = open_index(work / "index"), open_index(work / "rebuilt")
    assert (after.manifest.n_images, after.manifest.n_captions) == (before.manifest.n_images, before.manifest.n_captions)
    assert after.manifest.fingerprint == before.manifest.fingerprint
    np.testing.assert_allclose(after.image_vectors, before.image_vectors, atol=1e-6)
    assert [(r.path, r.width, r.sha1) for r in after.catalog.all_images()] == \
        [(r.path, r.width, r.sha1) for r in before.catalog.all_images()]
    for query in (["--text", "a red circle"], ["--text", "green bar", "--target", "captions"]):
        assert _query(work, "rebuilt", *query) == _query(work, "index", *query)


def test_a_clip_retrieval_folder_needs_its_model_and_builds(captioned_index, tiny_model_spec):
    """clip-retrieval's layout: float16 vectors, no embeddings.json, metadata with image_path and caption only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = captioned_index
    index = open_index(work / "index")
    folder = work / "clip_retrieval_out"
    for name in ("img_emb", "text_emb", "metadata"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    links = index.catalog.caption_links()
    records = {r.id: r.path for r in index.catalog.all_images()}
    texts = index.catalog.captions([c for c, _ in links])
    np.save(folder / "img_emb" / "img_emb_0.npy", index.image_vectors[[i for _, i in links]].astype(np.float16))
    np.save(folder / "text_emb" / "text_emb_0.npy", index.caption_vectors[[c for c, _ in links]].astype(np.float16))
    pq.write_table(pa.table({"image_path": [records[i] for _, i in links],
                             "caption": [texts[c].text for c, _ in links]}), folder / "metadata" / "metadata_0.parquet")
    command = [sys.executable, "-m", "indexer", "build", "--format", "embeddings", "--embeddings", str(folder),
               "--out", "from_cr"]
    refused = subprocess.run(command, cwd=work, capture_output=True, text=True)
    assert refused.returncode == 1 and "--model" in refused.stderr and len(refused.stderr.splitlines()) == 1
    done = subprocess.run(command + ["--model", tiny_model_spec], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    built = open_index(work / "from_cr")
    assert (built.manifest.n_images, built.manifest.n_captions) == (9, 27)
    assert built.manifest.fingerprint == index.manifest.fingerprint
    assert _query(work, "from_cr", "--text", "a red circle")[0] == _query(work, "index", "--text", "a red circle")[0]
