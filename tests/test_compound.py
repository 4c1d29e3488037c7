"""Compound queries (weighted text/image terms, "without" terms) against numpy brute force, through the library, the
command line (another working directory, relative paths) and POST /api/search."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from search.errors import NotFoundError, QueryError
from search.images import load_image
from search.query import Filters, Query, Term
from search.searcher import Searcher

from .helpers import build_test_index, make_pairs

PAIRS = make_pairs(16, seed=11)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("compound"), PAIRS, tiny_model_spec)


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher.open(index_dir)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def oracle(vectors: np.ndarray, parts: list[tuple[np.ndarray, float]], k: int) -> list[int]:
    """Top-k ids by inner product with the unit-normalised weighted sum of unit vectors (numpy, stable order)."""
    query = unit(sum(w * unit(v.astype(np.float64)) for v, w in parts))
    return np.argsort(-(vectors.astype(np.float64) @ query), kind="stable")[:k].tolist()


def test_weighted_text_image_and_minus_terms_match_brute_force(searcher, index_dir):
    encoder = searcher.encoder
    images = np.load(index_dir / "image_vectors.npy")
    photo = index_dir.parent / "images" / PAIRS[3][0]
    red, bar = encoder.encode_texts(["a red circle", "a bar"])
    photo_vector = encoder.encode_images([load_image(photo)])[0]
    query = Query((Term(text="a red circle"), Term(image=photo.read_bytes(), weight=0.5),
                   Term(text="a bar", weight=-0.5), Term(image_id=7, weight=0.25)), k=8)
    hits = searcher.run(query).hits
    expected = oracle(images, [(red, 1), (photo_vector, 0.5), (bar, -0.5), (images[7], 0.25)], 8)
    assert [h.image_id for h in hits] == expected
    combined = unit(red / np.linalg.norm(red) + 0.5 * unit(photo_vector) - 0.5 * unit(bar) + 0.25 * unit(images[7]))
    np.testing.assert_allclose([h.score for h in hits], images[expected] @ combined, atol=1e-4)
    captions = np.load(index_dir / "caption_vectors.npy")
    caption_hits = searcher.run(Query(query.terms, target="captions", k=5)).hits
    assert [h.caption_id for h in caption_hits] == oracle(
        captions, [(red, 1), (photo_vector, 0.5), (bar, -0.5), (images[7], 0.25)], 5)


def test_subtracting_part_of_the_same_text_keeps_its_order_and_all_of_it_is_an_error(searcher, index_dir):
    plain = searcher.run(Query((Term(text="a red circle"),), k=len(PAIRS))).hits
    without = searcher.run(Query((Term(text="a red circle"), Term(text="a red circle", weight=-0.5)), k=3)).hits
    assert [h.image_id for h in without] == [h.image_id for h in plain[:3]]  # same direction, same order
    with pytest.raises(QueryError, match="cancel out"):
        searcher.run(Query((Term(text="a red circle"), Term(text="a red circle", weight=-1)),))


@pytest.mark.parametrize("terms, message", [
    ((), "at least one term"),
    ((Term(text="a", weight=-1),), "positive weight"),
    ((Term(image_id=999),), "no image with id 999"),
])
def test_bad_compound_queries(searcher, terms, message):
    with pytest.raises((QueryError, NotFoundError), match=message):
        searcher.run(Query(terms))


def test_term_needs_exactly_one_thing():
    for bad in ({}, {"text": "a", "image_id": 1}):
        with pytest.raises(QueryError, match="exactly one of"):
            Term(**bad)
    with pytest.raises(QueryError, match="non-zero"):
        Term(text="a", weight=0)


def test_query_from_json_and_filters_from_json():
    query = Query.from_json({"terms": [{"text": "a dog"}, {"image_id": 12, "weight": 0.5},
                                       {"text": "leash", "weight": -0.5}], "k": 20, "cutoff": "auto",
                             "filters": {"path_prefix": "a/", "taken_after": "2024-05-01",
                                         "taken_before": "2024-05-01"}, "mode": "hybrid", "dedupe": True})
    assert [t.weight for t in query.terms] == [1, 0.5, -0.5] and query.cutoff == "auto" and query.dedupe
    day = query.filters.taken_before - query.filters.taken_after
    assert query.filters.path_prefix == "a/" and 86399 < day < 86400  # a bare "before" date includes that day
    assert Filters.from_dict({"min_width": "64"}).min_width == 64
    for bad, message in (({"terms": []}, "non-empty"), ({"terms": [{"text": "a"}], "k": "x"}, "k must be"),
                         ({"terms": [{"image": "***"}]}, "base64"), ({"terms": [{"text": "a"}], "x": 1}, "unknown"),
                         ({"terms": [{"text": "a"}], "cutoff": 7}, "cutoff"),
                         ({"terms": [{"text": "a"}], "filters": {"colour": "red"}}, "unknown filter"),
                         ({"terms": [{"text": "a"}], "mode": "magic"}, "unknown mode")):
        with pytest.raises(QueryError, match=message):
            Query.from_json(bad)


def test_cli_compound_query_from_another_directory(index_dir, searcher, tmp_path):
    """The README's command, relative paths, run from a directory that is not the repository."""
    work = index_dir.parent
    photo = Path("images") / PAIRS[5][0]
    done = subprocess.run([sys.executable, "-m", "search", "query", "--index", "index", "--text", "a green square",
                           "--image", str(photo), "--minus-text", "a bar", "--weights", "1,0.5,0.5", "-k", "6",
                           "--json"], cwd=work, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    got = [r["image"] for r in json.loads(done.stdout)["results"]]
    green, bar = searcher.encoder.encode_texts(["a green square", "a bar"])
    photo_vector = searcher.encoder.encode_images([load_image(work / photo)])[0]
    expected = oracle(np.load(index_dir / "image_vectors.npy"), [(green, 1), (photo_vector, 0.5), (bar, -0.5)], 6)
    assert got == [PAIRS[i][0] for i in expected]
