"""POST /api/search (issue 13's compound queries) through Flask's test client: 400 on malformed bodies, and the
200 answers checked against numpy brute force over the index's stored vectors (the browser side of the same
features: tests/test_web_compound.py)."""
import base64

import numpy as np
import pytest

from web import create_app

from .helpers import build_test_index, make_pairs
from .test_web_compound import assert_ranked_like, encode, oracle_scores

API_PAIRS = make_pairs(30, seed=5)


@pytest.fixture(scope="module")
def api_index(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("compound_api"), API_PAIRS, tiny_model_spec)


@pytest.fixture(scope="module")
def client(api_index):
    return create_app(index=api_index).test_client()


def post(client, body):
    return client.post("/api/search", json=body)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


TEXT = [{"text": "a red circle"}]


@pytest.mark.parametrize("body, says", [
    ({"terms": [{"image": "@@ not base64 @@"}]}, "base64"),
    ({"terms": [{"image": _b64(b"these bytes are no image")}]}, "not an image"),
    ({"terms": TEXT, "colour": "red"}, "unknown field 'colour'"),
    ({"terms": [{"text": "a dog", "language": "en"}]}, "unknown term field 'language'"),
    ({"terms": [{"text": "a dog", "weight": 0}]}, "non-zero"),
    ({"terms": [{"text": "a dog", "weight": "heavy"}]}, "number"),
    ({"terms": [{"text": "a dog", "weight": -1}]}, "positive weight"),
    ({"terms": [{"text": "a dog"}, {"text": "a dog", "weight": -1}]}, "cancel out"),
    ({"terms": [{"text": "a dog", "image_id": 1}]}, "exactly one"),
    ({"terms": []}, "terms"),
    ({"terms": TEXT, "cutoff": "sometimes"}, "cutoff"),
    ({"terms": TEXT, "cutoff": 1.5}, "cutoff"),
    ({"terms": TEXT, "mode": "fuzzy"}, "mode"),
    ({"terms": TEXT, "sort": "colour"}, "sort"),
    ({"terms": TEXT, "dedupe": "yes"}, "dedupe"),
    ({"terms": TEXT, "k": 0}, "k must be"),
    ({"terms": TEXT, "filters": {"taken_after": "last tuesday"}}, "date"),
    ({"terms": TEXT, "filters": {"min_width": -5}}, "negative"),
    ({"terms": TEXT, "filters": {"colour": "red"}}, "unknown filter"),
    ({"terms": [{"image_id": 1}], "mode": "keyword"}, "text term"),
    ([{"text": "a dog"}], "JSON object"),
])
def test_post_rejects_malformed_bodies(client, body, says):
    answer = post(client, body)
    assert answer.status_code == 400, answer.get_json()
    assert list(answer.get_json()) == ["error"] and says in answer.get_json()["error"]


def test_post_rejects_a_body_that_is_not_json_and_unknown_image_ids(client):
    answer = client.post("/api/search", data="terms=a dog", content_type="text/plain")
    assert answer.status_code == 400 and "JSON" in answer.get_json()["error"]
    answer = post(client, {"terms": [{"image_id": 999}]})
    assert answer.status_code == 404 and answer.get_json() == {"error": "no image with id 999"}


def test_post_compound_ranks_like_numpy(client, api_index, tiny_encoder):
    photo = api_index.parent / "images" / API_PAIRS[7][0]
    body = {"terms": [{"text": "a red circle", "weight": 1}, {"image_id": 4, "weight": 0.5},
                      {"image": _b64(photo.read_bytes())}, {"text": "dark", "weight": -0.5}],
            "k": 10, "cutoff": "none"}
    answer = post(client, body)
    assert answer.status_code == 200
    found = answer.get_json()
    assert set(found) == {"query", "took_ms", "results"}  # nothing cut, so no cutoff, message or closest
    assert found["query"] == "“a red circle” +0.5×image 4 an image -0.5×“dark”"
    vectors = np.load(api_index / "image_vectors.npy")
    scores = oracle_scores(vectors, [encode(tiny_encoder, text="a red circle"), vectors[4],
                                     encode(tiny_encoder, image=photo), encode(tiny_encoder, text="dark")],
                           [1, 0.5, 1, -0.5])
    ids = [r["id"] for r in found["results"]]
    assert len(ids) == 10 and [r["rank"] for r in found["results"]] == list(range(1, 11))
    assert_ranked_like(ids, scores)
    assert [r["score"] for r in found["results"]] == pytest.approx(scores[ids].tolist(), abs=1e-4)
    first = found["results"][0]
    assert set(first) >= {"id", "image", "score", "relevance", "captions", "thumbnail", "taken"}
    assert first["thumbnail"] == f"/thumb/{first['id']}" and 0 <= first["relevance"] <= 1

    page = post(client, {**body, "k": 4, "offset": 3}).get_json()["results"]  # "Load more": the next ranks
    assert [r["id"] for r in page] == ids[3:7] and [r["rank"] for r in page] == [4, 5, 6, 7]


def test_post_cutoff_keeps_the_calibrated_prefix_or_says_nothing_relevant(client):
    everything = post(client, {"terms": TEXT, "k": 30, "cutoff": "none"}).get_json()["results"]
    cut = post(client, {"terms": TEXT, "k": 30, "cutoff": "auto"}).get_json()
    level = cut["cutoff"]["level"]
    assert cut["cutoff"]["rule"] == "calibrated" and 0 < level < 1
    kept = [r["id"] for r in everything if r["relevance"] >= level]
    assert [r["id"] for r in cut["results"]] == kept == [r["id"] for r in everything[:len(kept)]]
    impossible = post(client, {"terms": TEXT, "k": 30, "cutoff": 1}).get_json()
    assert max(r["relevance"] for r in everything) < 1  # so a cutoff of 1 leaves nothing
    assert impossible["results"] == [] and impossible["message"].startswith("nothing relevant; the closest were")
    assert [r["id"] for r in impossible["closest"]] == [r["id"] for r in everything[:len(impossible["closest"])]]
    assert impossible["closest"] and impossible["closest"][0]["image"] in impossible["message"]


def test_post_filters_keyword_and_dedupe(client, api_index, tiny_encoder):
    vectors = np.load(api_index / "image_vectors.npy")
    scores = oracle_scores(vectors, [encode(tiny_encoder, text="a red circle")], [1])
    names = [p[0] for p in API_PAIRS]  # catalog ids follow the annotation order

    found = post(client, {"terms": TEXT, "k": 30, "filters": {"path_prefix": "img_00"}}).get_json()["results"]
    allowed = [i for i, name in enumerate(names) if name.startswith("img_00")]
    assert sorted(r["id"] for r in found) == allowed and all(r["image"].startswith("img_00") for r in found)
    restricted = np.full_like(scores, -np.inf)
    restricted[allowed] = scores[allowed]
    assert_ranked_like([r["id"] for r in found], restricted)

    none = post(client, {"terms": TEXT, "filters": {"min_width": 1000}}).get_json()
    assert none["results"] == [] and "message" not in none  # nothing to show, and nothing "closest" either

    keyword = post(client, {"terms": TEXT, "k": 30, "mode": "keyword"}).get_json()["results"]
    with_words = [i for i, (_, captions, _) in enumerate(API_PAIRS)
                  if any(w in c.split() for c in captions for w in ("red", "circle"))]
    assert sorted(r["id"] for r in keyword) == with_words
    assert all(r["score"] is None and r["matched"] == ["caption"] for r in keyword)

    deduped = post(client, {"terms": TEXT, "k": 10, "dedupe": True}).get_json()
    threshold = client.application.extensions["image_search"].searcher.index.manifest.near_duplicates["near"]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if all(unit[i] @ unit[j] < threshold["threshold"] for j in kept):
            kept.append(int(i))
    assert [r["id"] for r in deduped["results"]] == kept[:10]
