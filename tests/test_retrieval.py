"""Searcher.run end to end on a real index: filters, cutoff, hybrid rank fusion, dedupe and date order, each checked
against a numpy / plain-Python computation over the index's own files."""
import json
import os
import shutil
import sqlite3

import numpy as np
import pytest

from search.query import Filters, Query, Term
from search.relevance import Calibration
from search.retrieval import RRF_K
from search.searcher import Searcher

from .helpers import make_pairs, write_csv, write_images

PAIRS = make_pairs(24, seed=21)
DAY = 86400


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    """24 captioned images in two folders, three of them copied byte for byte (duplicates), dates a day apart."""
    from indexer.cli import main as indexer_main

    root = tmp_path_factory.mktemp("retrieval")
    images = root / "images"
    write_images(images, PAIRS[:12], "beach")
    write_images(images, PAIRS[12:], "city")
    rows = [(f"beach/{n}", caps, t) for n, caps, t in PAIRS[:12]] + [(f"city/{n}", caps, t) for n, caps, t in PAIRS[12:]]
    for i in range(3):  # copies of beach/img_00i under another name: the same pixels
        shutil.copy(images / "beach" / PAIRS[i][0], images / "city" / f"copy_{i}.png")
        rows.append((f"city/copy_{i}.png", ("a copy",), PAIRS[i][2]))
    for i, (name, _, _) in enumerate(rows):
        os.utime(images / name, (1.7e9 + i * DAY, 1.7e9 + i * DAY))
    annotations = write_csv(root / "captions.csv", rows)
    out = root / "index"
    assert indexer_main(["build", "--format", "csv", "--annotations", str(annotations), "--images", str(images),
                         "--out", str(out), "--model", tiny_model_spec, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher.open(index_dir)


@pytest.fixture(scope="module")
def rows(index_dir):
    with sqlite3.connect(index_dir / "catalog.sqlite") as db:
        return {i: (path, taken) for i, path, taken in db.execute("SELECT id, path, taken FROM images")}


def brute(searcher, index_dir, text, allowed=None):
    vectors = np.load(index_dir / "image_vectors.npy")
    scores = vectors @ searcher.encoder.encode_texts([text])[0]
    order = [int(i) for i in np.argsort(-scores, kind="stable") if allowed is None or i in allowed]
    return order, scores


def test_filters_return_k_matching_results_in_brute_force_order(searcher, index_dir, rows):
    city = {i for i, (path, _) in rows.items() if path.startswith("city/")}
    hits = searcher.run(Query((Term(text="a red circle"),), k=10, filters=Filters(path_prefix="city/"))).hits
    assert [h.image_id for h in hits] == brute(searcher, index_dir, "a red circle", city)[0][:10]
    late = {i for i, (_, taken) in rows.items() if taken >= 1.7e9 + 20 * DAY}
    hits = searcher.run(Query((Term(text="a square"),), k=10, filters=Filters(taken_after=1.7e9 + 20 * DAY))).hits
    assert [h.image_id for h in hits] == brute(searcher, index_dir, "a square", late)[0][:10] and len(late) == 7


def test_every_hit_carries_the_calibrated_relevance_and_the_cutoff_keeps_those_above(searcher, index_dir):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    calibration = Calibration.from_dict(manifest["relevance"])
    assert calibration.calibrated("text_image")
    everything = searcher.run(Query((Term(text="a red circle"),), k=27)).hits
    expected = calibration.relevance("text_image", np.array([h.score for h in everything]))
    np.testing.assert_allclose([h.relevance for h in everything], expected, atol=1e-6)
    for level in (0.3, calibration.target):
        cut = searcher.run(Query((Term(text="a red circle"),), k=27, cutoff=level))
        assert [h.image_id for h in cut.hits] == [h.image_id for h in everything if h.relevance >= level]
        assert cut.cutoff == level and cut.cutoff_rule == "calibrated"
    nothing = searcher.run(Query((Term(text="a red circle"),), k=5, cutoff=1.0))
    if not nothing.hits:  # an empty answer names the closest hits
        assert nothing.message.startswith("nothing relevant; the closest were ")
        assert [h.image_id for h in nothing.closest] == [h.image_id for h in everything[:3]]


def test_hybrid_fuses_the_two_rankings_by_reciprocal_rank(searcher, index_dir):
    text = "purple triangle"
    index = searcher.index
    vector_ids, scores = brute(searcher, index_dir, text)
    keyword = [i for i, _, _ in index.catalog.keyword_images(text, 200)]
    assert keyword, "the test needs keyword matches"
    captions = index.catalog.captions_of(range(index.manifest.n_images))
    assert set(keyword) == {i for i, texts in captions.items() if any(w in c.split() for c in texts for w in
                                                                       text.split())}
    fused = {}
    for ranking in (vector_ids[:200], keyword):
        for position, i in enumerate(ranking):
            fused[i] = fused.get(i, 0) + 1 / (RRF_K + position + 1)
    expected = sorted(fused, key=lambda i: (-fused[i], -scores[i], i))[:10]
    hits = searcher.run(Query((Term(text=text),), k=10, mode="hybrid")).hits
    assert [h.image_id for h in hits] == expected
    assert all(("caption" in h.matched) == (h.image_id in keyword) for h in hits)
    np.testing.assert_allclose([h.score for h in hits], scores[expected], atol=1e-5)  # keyword-only hits scored too
    only_keywords = searcher.run(Query((Term(text=text),), k=10, mode="keyword")).hits
    assert [h.image_id for h in only_keywords] == keyword[:10]


def test_dedupe_collapses_copies_into_the_better_hit(searcher, index_dir, rows):
    vectors = np.load(index_dir / "image_vectors.npy")
    copies = {i: next(j for j, (p, _) in rows.items() if p == f"beach/{PAIRS[int(path[-5])][0]}")
              for i, (path, _) in rows.items() if path.startswith("city/copy_")}
    first = min(copies.values())
    query = Query((Term(image_id=first),), k=26)
    plain = [h.image_id for h in searcher.run(query).hits]
    deduped = [h.image_id for h in searcher.run(Query(query.terms, k=26, dedupe=True)).hits]
    threshold = searcher.index.manifest.near_duplicates.get("near", {}).get("threshold", 0.95)
    kept = []  # greedy over the plain ranking, as documented
    for i in plain:
        if all(float(vectors[i] @ vectors[j]) < threshold for j in kept):
            kept.append(i)
    assert deduped == kept
    for copy, original in copies.items():  # byte-identical files: one of each pair survives
        assert (copy in deduped) != (original in deduped)


def test_sort_by_date_orders_the_relevant_hits_newest_first(searcher, rows):
    by_relevance = searcher.run(Query((Term(text="a blue bar"),), k=8, cutoff=0.0)).hits
    by_date = searcher.run(Query((Term(text="a blue bar"),), k=8, cutoff=0.0, sort="date")).hits
    pool = searcher.run(Query((Term(text="a blue bar"),), k=27, cutoff=0.0)).hits
    newest = sorted(pool, key=lambda h: -rows[h.image_id][1])[:8]
    assert [h.image_id for h in by_date] == [h.image_id for h in newest]
    assert [h.taken for h in by_date] == sorted((h.taken for h in by_date), reverse=True)
    assert len(by_relevance) == 8


def test_a_compound_querys_relevance_is_the_least_over_its_positive_terms(searcher, index_dir):
    calibration = Calibration.from_dict(json.loads((index_dir / "manifest.json").read_text())["relevance"])
    assert calibration.calibrated("text_image") and calibration.calibrated("image_image")
    images = np.load(index_dir / "image_vectors.npy")
    red = searcher.encoder.encode_texts(["a red circle"])[0]
    query = Query((Term(text="a red circle"), Term(image_id=3, weight=0.5), Term(text="a bar", weight=-0.5)), k=12)
    hits = searcher.run(query).hits
    rows = images[[h.image_id for h in hits]]
    expected = np.minimum(calibration.relevance("text_image", rows @ red),
                          calibration.relevance("image_image", rows @ (images[3] / np.linalg.norm(images[3]))))
    np.testing.assert_allclose([h.relevance for h in hits], expected, atol=1e-5)
    cut = searcher.run(Query(query.terms, k=12, cutoff=0.2)).hits
    assert [h.image_id for h in cut] == [h.image_id for h in hits if h.relevance >= 0.2]
