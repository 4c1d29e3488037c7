import json
import shutil

import numpy as np
import pytest

from search.cli import main as search_main
from search.errors import ImageReadError, ModelMismatchError, NotFoundError, QueryError
from search.images import load_image
from search.searcher import Searcher
from search.store import open_index

from .helpers import build_test_index, make_pairs

PAIRS = make_pairs(12, seed=3)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("search"), PAIRS, tiny_model_spec)


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher.open(index_dir)


def brute_force(query: np.ndarray, vectors: np.ndarray, k: int):
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def test_text_to_image_matches_brute_force(searcher, index_dir):
    query = searcher.encoder.encode_texts(["a red circle"])[0]
    hits = searcher.search(text="a red circle", k=5)
    order, scores = brute_force(query, np.load(index_dir / "image_vectors.npy"), 5)
    assert [h.image_id for h in hits] == order.tolist()
    np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0].image == PAIRS[order[0]][0] and hits[0].captions == PAIRS[order[0]][1]


def test_image_to_image_and_image_to_text_match_brute_force(searcher, index_dir):
    photo = index_dir.parent / "images" / PAIRS[4][0]
    query = searcher.encoder.encode_images([load_image(photo)])[0]
    hits = searcher.search(image=photo, k=3)
    assert [h.image_id for h in hits] == brute_force(query, np.load(index_dir / "image_vectors.npy"), 3)[0].tolist()
    assert hits[0].image == PAIRS[4][0] and hits[0].score == pytest.approx(1.0, abs=1e-5)  # itself first
    caption_hits = searcher.search(image=photo.read_bytes(), target="captions", k=4)
    order, _ = brute_force(query, np.load(index_dir / "caption_vectors.npy"), 4)
    assert [h.caption_id for h in caption_hits] == order.tolist()
    all_captions = [c for _, caps, _ in PAIRS for c in caps]
    assert [h.caption for h in caption_hits] == [all_captions[i] for i in order]
    assert caption_hits[0].image == PAIRS[order[0] // 3][0]


def test_paging_is_consistent(searcher):
    full = searcher.search(text="green square", k=10)
    page = searcher.search(text="green square", k=4, offset=3)
    assert [h.image_id for h in page] == [h.image_id for h in full[3:7]] and page[0].rank == 4
    assert len(searcher.search(text="green square", k=10, offset=8)) == 4  # only 12 images


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "   "}, "empty text query"),
    ({"text": "x" * 1001}, "the limit is 1000"),
    ({"text": "a", "k": 0}, "k must be between"),
    ({"text": "a", "target": "videos"}, "unknown target"),
    ({"image": b"not an image"}, "not an image file"),
    ({}, "exactly one of"),
])
def test_bad_queries(searcher, kwargs, message):
    with pytest.raises(ImageReadError if "image" in kwargs else QueryError, match=message):
        searcher.search(**kwargs)


def test_similar_and_image_by_id_and_the_model_runner(index_dir, searcher):
    calls = []

    def runner(fn):  # what a server passes to route model calls (python -m web: to the main thread)
        calls.append(fn)
        return fn()

    own = Searcher(open_index(index_dir), searcher.encoder, run_model=runner)
    own.search(text="a red circle", k=2)
    own.search(image=index_dir.parent / "images" / PAIRS[0][0], k=2)
    similar = own.similar(5, k=4, offset=1)  # by the stored vector: no model call
    assert len(calls) == 2
    vectors = np.load(index_dir / "image_vectors.npy")
    assert [h.image_id for h in similar] == brute_force(vectors[5], vectors, 5)[0][1:].tolist()
    assert [h.rank for h in similar] == [2, 3, 4, 5]
    image = own.image(5)
    assert (image.record.id, image.record.path, image.captions) == (5, PAIRS[5][0], PAIRS[5][1])
    assert image.recorded_root == str((index_dir.parent / "images").resolve())
    for bad in (-1, len(PAIRS)):
        with pytest.raises(NotFoundError, match=f"no image with id {bad}"):
            own.similar(bad)
        with pytest.raises(NotFoundError, match=f"no image with id {bad}"):
            own.image(bad)


def test_cli_query_json_shapes(index_dir, capsys):
    assert search_main(["query", "--index", str(index_dir), "--text", "a blue bar", "-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert set(results[0]) == {"rank", "score", "image", "captions", "taken", "relevance"}
    assert len(results[0]["captions"]) == 3 and 0 <= results[0]["relevance"] <= 1
    photo = index_dir.parent / "images" / PAIRS[0][0]
    assert search_main(["query", "--index", str(index_dir), "--image", str(photo), "--target", "captions",
                        "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 10 and set(results[0]) == {"rank", "score", "caption", "image", "relevance"}
    assert search_main(["query", "--index", str(index_dir), "--text", "a blue bar", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1"


def test_cli_errors_are_one_line_with_exit_1(index_dir, tmp_path, capsys):
    cases = [
        (["query", "--index", str(tmp_path), "--text", "x"], "is not an index: no manifest.json"),
        (["query", "--index", str(tmp_path / "nope"), "--text", "x"], "no such index directory"),
        (["query", "--index", str(index_dir), "--text", ""], "empty text query"),
        (["query", "--index", str(index_dir), "--image", str(tmp_path / "missing.jpg")], "file not found"),
        (["eval", "--index", str(tmp_path)], "is not an index"),
    ]
    for argv, message in cases:
        assert search_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_wrong_model_is_refused(index_dir, trained_model_dir, tiny_model_dir, tmp_path, capsys):
    assert search_main(["query", "--index", str(index_dir), "--text", "x", "--model",
                        f"local-dir:{trained_model_dir}"]) == 1
    assert "was built with local-dir:" in capsys.readouterr().err
    # same spec, different weights (the model folder was retrained after the build)
    moved = tmp_path / "index"
    shutil.copytree(index_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["encoder"]["model"] = f"local-dir:{trained_model_dir}"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="changed since index"):
        Searcher.open(moved)


def test_corrupt_index_files_are_reported(index_dir, tmp_path, capsys):
    broken = tmp_path / "index"
    shutil.copytree(index_dir, broken)
    (broken / "images.faiss").write_bytes(b"junk")
    assert search_main(["query", "--index", str(broken), "--text", "x"]) == 1
    assert "cannot read FAISS index" in capsys.readouterr().err
    (broken / "images.faiss").unlink()
    assert search_main(["query", "--index", str(broken), "--text", "x"]) == 1
    assert "images.faiss is missing" in capsys.readouterr().err
    (broken / "manifest.json").write_text('{"format_version": 99}')
    assert search_main(["query", "--index", str(broken), "--text", "x"]) == 1
    assert "format version 99 is not supported" in capsys.readouterr().err
