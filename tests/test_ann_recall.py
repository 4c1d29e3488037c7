"""ANN recall you can see: recall@10 against exact search recorded per index at build and update (checked against a
numpy brute force on the same held-out queries), the trained quantiser kept or trained again by `update`,
/api/stats and the page footer."""
import json
import logging
import subprocess
import sys

import faiss
import numpy as np
import pytest

from indexer.ann_recall import count_new
from indexer.writer import IndexWriter
from search.index_choice import IndexOptions, held_out_queries
from search.manifest import Manifest, read_manifest
from search.store import open_index
from web import create_app
from web.config import WebConfig

from .browser import launch_browser, wait_until, web_server
from .helpers import draw, make_pairs, write_images

D = 32  # the tiny model's width: the synthetic indexes below name it, so the web app can open them


def clustered(n, centres, seed, topics_seed=0):
    """Unit vectors around `centres` topic centres (drawn from `topics_seed`); points drawn from `seed`."""
    middle = np.random.default_rng(topics_seed).standard_normal((centres, D)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = middle[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(vectors, seed):
    """A caption vector near each image vector (cosine ~0.8)."""
    x = vectors + 0.1 * np.random.default_rng(seed).standard_normal(vectors.shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_index(out, images, captions, encoder, options, update=False, names=None):
    """An index of `images` (one caption vector each) written by the real writer; `update`: as `indexer update`
    commits (job update, replacing `out`)."""
    names = names or [f"img_{i:05d}.png" for i in range(len(images))]
    with IndexWriter(out, overwrite=update, dim=D, job={"update": update}) as writer:
        for name, image, caption in zip(names, images, captions):
            writer.add(name, (8, 8), [f"caption of {name}"], image, caption[None])
        writer.checkpoint(len(images), [])
        return writer.commit(Manifest(encoder=encoder.spec, fingerprint=encoder.fingerprint, dim=D,
                                      n_images=writer.n_images, n_captions=writer.n_captions), options)


def brute_force_recall(index_dir, kind, entry):
    """recall@10 of the stored index at its recorded params against a numpy brute force, on the held-out queries
    the documented procedure draws (index_choice.held_out_queries, seed 0, from the other kind's vectors)."""
    other = "captions" if kind == "images" else "images"
    stored = open_index(index_dir)
    vectors = np.asarray(stored.vectors(kind), np.float32)
    queries = held_out_queries(vectors, np.asarray(stored.vectors(other), np.float32), np.random.default_rng(0))
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    index = getattr(stored, kind)
    assert index.params == entry["params"]
    found = index.search(queries, 10)[1]
    return float(np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth)])), len(queries)


def centroids(index_dir, kind):
    index = faiss.read_index(str(index_dir / f"{kind}.faiss"))  # kept referenced: it owns the quantiser
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


BASE = clustered(3000, 48, seed=1)
IVF = IndexOptions(factory="IVF16,Flat", target_recall=0.95)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_encoder):
    out = tmp_path_factory.mktemp("ann") / "index"
    write_index(out, BASE, near(BASE, 2), tiny_encoder, IVF)
    return out


def test_build_records_recall_a_numpy_brute_force_reproduces(built):
    manifest = read_manifest(built)
    for kind in ("images", "captions"):
        entry = manifest.indexes[kind]
        assert manifest.factory(kind) == "IVF16,Flat"
        assert entry["recall_measured"] == "build" and entry["trained_on"] == 3000
        assert entry["added_since_training"] == 0 and entry["target_recall"] == 0.95
        recall, queries = brute_force_recall(built, kind, entry)
        assert entry["recall_queries"] == queries == 500
        assert entry["recall_at_10"] == pytest.approx(recall, abs=2e-3)
        assert entry["recall_at_10"] >= 0.95


def test_update_keeps_the_trained_quantiser_and_records_the_share(built, tmp_path, tiny_encoder, caplog):
    out = tmp_path / "index"
    write_index(out, BASE, near(BASE, 2), tiny_encoder, IVF)
    # 10 % more of the same topics; the update reorders ids (new files sort among the old ones)
    new = clustered(300, 48, seed=3)
    images = np.concatenate([BASE, new])
    names = [f"img_{i:05d}.png" for i in range(3000)] + [f"img_{i:05d}b.png" for i in range(300)]
    order = np.argsort(names, kind="stable")
    with caplog.at_level(logging.INFO, logger="indexer.ann_recall"):
        write_index(out, images[order], near(images, 2)[order], tiny_encoder, IndexOptions(target_recall=0.95),
                    update=True, names=[names[i] for i in order])
    assert "images index: kept IVF16,Flat trained on 3000 vectors (9% of 3300 added since)" in caplog.text
    manifest = read_manifest(out)
    entry = manifest.indexes["images"]
    assert manifest.image_factory == "IVF16,Flat" and entry["recall_measured"] == "update"
    assert entry["trained_on"] == 3000 and entry["added_since_training"] == 300
    np.testing.assert_array_equal(centroids(out, "images"), centroids(built, "images"))  # not trained again
    recall, _ = brute_force_recall(out, "images", entry)  # ids follow the new catalog order
    assert entry["recall_at_10"] == pytest.approx(recall, abs=2e-3) and recall >= 0.95
    stored = open_index(out)
    row = int(np.flatnonzero(order == 3000)[0])  # where the first new vector went
    assert stored.catalog.images([row])[row].path == "img_00000b.png"
    assert stored.images.search(new[:1], 1)[1][0, 0] == row  # the kept index finds it under that catalog id


def test_update_below_the_target_trains_again(built, tmp_path, tiny_encoder, caplog):
    out = tmp_path / "index"
    write_index(out, BASE, near(BASE, 2), tiny_encoder, IVF)
    new_topics = clustered(1500, 48, seed=4, topics_seed=9)  # half as many again, of topics the quantiser never saw
    images = np.concatenate([BASE, new_topics])
    with caplog.at_level(logging.INFO, logger="indexer.ann_recall"):
        write_index(out, images, near(images, 2), tiny_encoder, IndexOptions(target_recall=0.95), update=True)
    assert "images index: training IVF16,Flat again: recall@10 0." in caplog.text
    assert "< target 0.950 with the quantiser trained on 3000 vectors (33% of the 4500 added since)" in caplog.text
    manifest = read_manifest(out)
    entry = manifest.indexes["images"]
    assert manifest.image_factory == "IVF16,Flat"  # the factory chosen at build (--index-type) stays
    assert entry["trained_on"] == 4500 and entry["added_since_training"] == 0
    assert entry["recall_measured"] == "update" and entry["recall_at_10"] >= 0.95
    assert not np.allclose(centroids(out, "images"), centroids(built, "images"))
    assert entry["recall_at_10"] == pytest.approx(brute_force_recall(out, "images", entry)[0], abs=2e-3)


def test_count_new_counts_rows_not_in_the_previous_file(tmp_path):
    old = clustered(50, 4, seed=5)
    np.save(tmp_path / "old.npy", old)
    changed = old[:3].copy()
    changed[:, 0] = np.nextafter(changed[:, 0], 2)  # one bit off: a different vector
    rows = np.concatenate([old[10:][::-1], changed, clustered(7, 4, seed=6)])
    assert count_new(rows, tmp_path / "old.npy") == 10
    assert count_new(rows, tmp_path / "missing.npy") == len(rows)


def test_api_stats_shape(built):
    client = create_app(WebConfig(index=built)).test_client()
    stats = client.get("/api/stats").get_json()
    manifest = read_manifest(built)
    assert stats["images"] == stats["captions"] == 3000 and stats["model"] == str(manifest.encoder)
    images = stats["indexes"]["images"]
    assert images["factory"] == "IVF16,Flat" and images["params"] == manifest.indexes["images"]["params"]
    assert images["vectors"] == 3000 and images["bytes_on_disk"] == (built / "images.faiss").stat().st_size
    assert images["recall_at_10"] == manifest.indexes["images"]["recall_at_10"] and not images["exact"]
    assert images["measured"] == {"by": "build", "at": manifest.created, "queries": 500}
    assert images["trained_on"] == 3000 and images["added_since_training"] == 0
    assert images["share_added_since_training"] == 0 and images["target_recall"] == 0.95


def test_cli_build_and_update_record_the_share_added_since_training(tmp_path, tiny_model_spec):
    """The user's way: `python -m indexer` from the data's folder with relative paths, then /api/stats."""
    pairs = make_pairs(40, seed=3)
    write_images(tmp_path / "photos", pairs[:32])

    def indexer(*args):
        done = subprocess.run([sys.executable, "-m", "indexer", *args, "--quiet"], cwd=tmp_path, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / "idx" / "manifest.json").read_text())

    manifest = indexer("build", "--format", "folder", "--images", "photos", "--out", "idx", "--model", tiny_model_spec,
                       "--index-type", "IVF4,Flat", "--target-recall", "0.9")
    assert manifest["indexes"]["images"]["trained_on"] == 32 and manifest["indexes"]["captions"] == {
        "params": {}, "recall_at_10": 1.0, "memory_bytes": 0, "trained_on": None, "recall_queries": 0,
        "exact": True}  # a folder has no captions: an empty, exact index
    for name, _, attrs in pairs[32:]:
        draw(*attrs).save(tmp_path / "photos" / name)
    manifest = indexer("update", "--index", "idx", "--target-recall", "0.5")
    entry = manifest["indexes"]["images"]
    assert manifest["image_factory"] == "IVF4,Flat" and entry["recall_measured"] == "update"
    assert (entry["trained_on"], entry["added_since_training"]) == (32, 8)
    stats = create_app(WebConfig(index=tmp_path / "idx")).test_client().get("/api/stats").get_json()
    assert stats["indexes"]["images"]["share_added_since_training"] == 0.2
    assert stats["indexes"]["captions"]["exact"] and stats["indexes"]["captions"]["measured"] is None


@pytest.mark.slow
@pytest.mark.browser
def test_footer_shows_the_index_and_its_recall(built):
    entry = read_manifest(built).indexes["images"]
    with launch_browser() as browser, web_server(built) as url:
        page = browser.new_page()
        page.goto(url)
        text = wait_until(page, "document.querySelectorAll('#index-stats p').length === 2 && "
                                "document.getElementById('index-stats').textContent")
    assert (f"images index IVF16,Flat · 3,000 vectors · recall@10 {entry['recall_at_10']:.3f} vs exact "
            f"(measured at build)") in text
    assert "captions index IVF16,Flat · 3,000 vectors · recall@10" in text
