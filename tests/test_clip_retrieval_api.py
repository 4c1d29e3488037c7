"""The clip-retrieval compatible API (web/clip_retrieval_api.py), checked with clip-retrieval's own ClipClient
against a real server, and its refusals through Flask's test client."""
import base64
import importlib
import importlib.util
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests

from web import create_app, image_urls
from web.config import WebConfig

from .browser import web_server
from .helpers import build_test_index, make_pairs

PAIRS = make_pairs(30, seed=11)
NAME = "photos"


def clip_client_module():
    """clip_retrieval.clip_client, unchanged. The package's __init__ imports its whole back end (flask_restful,
    pandas, h5py … which install.sh leaves out: `--no-deps`), so when that import fails the client's own file is
    loaded from the installed package; it needs only `requests`."""
    try:
        return importlib.import_module("clip_retrieval.clip_client")
    except ImportError:
        pass
    spec = importlib.util.find_spec("clip_retrieval")  # locates the package without running its __init__
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("clip-retrieval is not installed; install.sh installs it")
        pytest.skip("clip-retrieval not installed (bash install.sh)")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("clipret"), PAIRS, tiny_model_spec, name=NAME)


@pytest.fixture(scope="module")
def server(index_dir):
    with web_server(index_dir) as url:
        yield url


@pytest.fixture(scope="module")
def client(index_dir):
    return create_app(WebConfig(index=index_dir, max_upload_mb=1)).test_client()


def ours(url: str, **body) -> list[dict]:
    answer = requests.post(f"{url}/api/search", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def assert_same(results: list[dict], expected: list[dict]) -> None:
    assert [r["id"] for r in results] == [e["id"] for e in expected]
    assert [r["similarity"] for r in results] == pytest.approx([e["score"] for e in expected], abs=1e-6)


def test_clip_client_text_image_and_embedding_queries(server, index_dir):
    clip = clip_client_module()
    cc = clip.ClipClient(url=f"{server}/knn-service", indice_name=NAME, num_images=5)
    results = cc.query(text="a red circle")
    assert len(results) == 5 and set(results[0]) >= {"id", "similarity", "url", "image_path", "caption"}
    assert_same(results, ours(server, terms=[{"text": "a red circle"}], k=5, dedupe=True))
    first = results[0]
    assert first["image_path"] == PAIRS[first["id"]][0] and first["caption"] == PAIRS[first["id"]][1][0]
    assert requests.get(first["url"], timeout=30).content == (index_dir.parent / "images" / first["image_path"]
                                                              ).read_bytes()

    photo = index_dir.parent / "images" / PAIRS[7][0]
    results = cc.query(image=str(photo))
    encoded = base64.b64encode(photo.read_bytes()).decode()
    assert_same(results, ours(server, terms=[{"image": encoded}], k=5, dedupe=True))
    assert results[0]["image_path"] == PAIRS[7][0] and results[0]["similarity"] == pytest.approx(1, abs=1e-4)

    vectors = np.load(index_dir / "image_vectors.npy")
    plain = clip.ClipClient(url=f"{server}/knn-service", indice_name=NAME, num_images=4, deduplicate=False)
    results = plain.query(embedding_input=(3 * vectors[4]).tolist())  # any length: normalised first
    similar = requests.get(f"{server}/api/search/similar?id=4&k=4", timeout=60).json()["results"]
    assert_same(results, similar)


def test_clip_client_text_modality_searches_captions(server):
    clip = clip_client_module()
    cc = clip.ClipClient(url=f"{server}/knn-service", indice_name=NAME, num_images=6, modality=clip.Modality.TEXT)
    results = cc.query(text="green triangle")
    expected = ours(server, terms=[{"text": "green triangle"}], target="captions", k=6)
    assert_same(results, expected)
    assert [r["caption"] for r in results] == [e["caption"] for e in expected]
    assert [r["caption_id"] for r in results] == [e["caption_id"] for e in expected]


def test_metadata_indices_list_and_cors(server):
    listed = requests.get(f"{server}/indices-list", timeout=30)
    assert listed.json() == [NAME] and listed.headers["Access-Control-Allow-Origin"] == "*"
    answer = requests.post(f"{server}/metadata", data='{"indice_name": "photos", "ids": [3, 0]}', timeout=30)
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    body = answer.json()
    assert [item["id"] for item in body] == [3, 0]
    assert body[0]["metadata"]["image_path"] == PAIRS[3][0] and body[0]["metadata"]["caption"] == PAIRS[3][1][0]
    assert body[0]["metadata"]["captions"] == list(PAIRS[3][1]) and body[0]["metadata"]["url"].endswith("/image/3")
    assert requests.post(f"{server}/metadata", json={"indice_name": NAME, "ids": []}, timeout=30).json() == []
    preflight = requests.options(f"{server}/knn-service", timeout=30)
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Origin" not in requests.get(f"{server}/api/health", timeout=30).headers


def knn(client, **body):
    return client.post("/knn-service", json={"indice_name": NAME, "num_images": 3, **body})


@pytest.mark.parametrize("body, message", [
    ({"text": "a", "indice_name": "laion5B"}, "unknown indice_name"),
    ({"text": "a", "modality": "video"}, "modality"),
    ({}, "exactly one"),
    ({"text": "a", "embedding_input": [1.0]}, "exactly one"),
    ({"image": "not base64!"}, "base64"),
    ({"embedding_input": [1.0, 2.0]}, "finite numbers"),
    ({"embedding_input": ["x"]}, "list of numbers"),
    ({"text": "a", "num_images": 0}, "positive integer"),
    ({"text": "a", "num_images": 1000}, "at most"),
    ({"text": "a", "deduplicate": "yes"}, "true or false"),
    ({"image_url": "http://example.com/a.png"}, "--allow-image-urls"),
])
def test_bad_knn_requests_are_400(client, body, message):
    answer = knn(client, **body)
    assert answer.status_code == 400 and message in answer.get_json()["error"], answer.get_json()


def test_zero_vector_and_bad_metadata(client, index_dir):
    dim = np.load(index_dir / "image_vectors.npy").shape[1]
    assert "length zero" in knn(client, embedding_input=[0.0] * dim).get_json()["error"]
    assert knn(client, text="a", use_mclip=True, aesthetic_score=9, aesthetic_weight=0.5, use_safety_model=True,
               use_violence_detector=True).status_code == 200  # accepted, ignored
    assert client.post("/metadata", json={"indice_name": NAME, "ids": "3"}).status_code == 400
    assert client.post("/metadata", json={"indice_name": "x", "ids": [3]}).status_code == 400
    assert client.post("/metadata", json={"indice_name": NAME, "ids": [999]}).status_code == 404
    assert client.post("/knn-service", data="not json").status_code == 400
    too_big = client.post("/knn-service", data="x" * 2_000_000)  # the app's upload limit is 1 MB here
    assert too_big.status_code == 413 and "error" in too_big.get_json()


def test_a_bug_is_a_json_500(index_dir, monkeypatch):
    app = create_app(index=index_dir)
    monkeypatch.setattr(app.extensions["image_search"].searcher, "run", lambda query: {}[0])
    answer = app.test_client().post("/knn-service", json={"text": "a", "num_images": 2})
    assert answer.status_code == 500 and answer.get_json() == {"error": "internal error"}


@pytest.mark.parametrize("address, public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("169.254.169.254", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False), ("fc00::1", False),
    ("100.64.0.1", False), ("224.0.0.1", False), ("8.8.8.8", True), ("2606:4700::1111", True)])
def test_public_address_check(address, public):
    assert image_urls.is_public(address) is public


@pytest.fixture
def image_host(index_dir):
    """A loopback HTTP server over the test images."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(index_dir.parent / "images"))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_image_urls_only_when_allowed_and_only_public(index_dir, image_host, monkeypatch):
    client = create_app(WebConfig(index=index_dir, max_upload_mb=1, allow_image_urls=True)).test_client()
    url = f"{image_host}/{PAIRS[7][0]}"
    for refused in (url, f"http://localhost:{image_host.rsplit(':', 1)[1]}/x.png", "file:///etc/passwd",
                    "http://169.254.169.254/latest/meta-data/"):
        answer = knn(client, image_url=refused)
        assert answer.status_code == 400 and "image_url" in answer.get_json()["error"], refused
    # the fetch itself, with the address check told that loopback is public
    monkeypatch.setattr(image_urls, "is_public", lambda address: True)
    results = knn(client, image_url=url).get_json()
    assert results[0]["image_path"] == PAIRS[7][0]
    assert results == knn(client, image=base64.b64encode((index_dir.parent / "images" / PAIRS[7][0]).read_bytes()
                                                          ).decode()).get_json()
    assert knn(client, image_url=f"{image_host}/missing.png").status_code == 400
    small = create_app(WebConfig(index=index_dir, max_upload_mb=0.0001, allow_image_urls=True)).test_client()
    assert "larger than" in knn(small, image_url=url).get_json()["error"]


def test_server_flag_enables_image_urls_but_not_loopback(index_dir):
    with web_server(index_dir, extra=("--allow-image-urls",)) as url:
        answer = requests.post(f"{url}/knn-service", json={"image_url": f"{url}/image/1", "indice_name": NAME,
                                                           "num_images": 2, "modality": "image"}, timeout=60)
        assert answer.status_code == 400 and "non-public" in answer.json()["error"]
