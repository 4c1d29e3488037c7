import io
import threading

import numpy as np
import pytest
from PIL import Image

from search.errors import IndexFormatError
from web import create_app
from web.config import WebConfig

from .helpers import build_test_index, make_pairs

PAIRS = make_pairs(30, seed=5)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("web"), PAIRS, tiny_model_spec)


@pytest.fixture(scope="module")
def app(index_dir):
    return create_app(WebConfig(index=index_dir, max_upload_mb=1))


@pytest.fixture
def client(app):
    return app.test_client()


def png_bytes(colour=(200, 30, 30), size=(40, 40), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def test_text_search_shape_and_paging(client, app):
    body = client.get("/api/search?q=a red circle&k=5").get_json()
    assert body["query"] == "a red circle" and isinstance(body["took_ms"], float) and len(body["results"]) == 5
    first = body["results"][0]
    assert set(first) >= {"id", "image", "score", "captions", "thumbnail"}
    assert first["thumbnail"] == f"/thumb/{first['id']}" and len(first["captions"]) == 3
    expected = app.extensions["image_search"].searcher.search(text="a red circle", k=5)
    assert [r["id"] for r in body["results"]] == [h.image_id for h in expected]
    page = client.get("/api/search?q=a red circle&k=2&offset=3").get_json()["results"]
    assert [r["id"] for r in page] == [r["id"] for r in body["results"][3:5]]


def test_image_search_for_images_and_captions(client, index_dir):
    photo = (index_dir.parent / "images" / PAIRS[7][0]).read_bytes()
    body = client.post("/api/search/image", data={"image": (io.BytesIO(photo), "q.png"), "k": "3"}).get_json()
    assert body["results"][0]["image"] == PAIRS[7][0] and body["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    body = client.post("/api/search/image", data={"image": (io.BytesIO(photo), "q.png"), "target": "captions",
                                                  "k": "4"}).get_json()
    assert len(body["results"]) == 4 and set(body["results"][0]) >= {"caption", "image", "score"}
    assert "captions" not in body["results"][0]


def test_similar_uses_the_stored_vector(client, index_dir):
    body = client.get("/api/search/similar?id=4&k=3").get_json()
    vectors = np.load(index_dir / "image_vectors.npy")
    assert [r["id"] for r in body["results"]] == np.argsort(-(vectors @ vectors[4]))[:3].tolist()
    assert client.get("/api/search/similar?id=999").status_code == 404


def test_only_unknown_ids_are_404(index_dir, monkeypatch):
    app = create_app(index=index_dir)
    client = app.test_client()
    answer = client.get("/api/images/999")
    assert answer.status_code == 404 and answer.get_json() == {"error": "no image with id 999"}
    assert client.get("/api/search/similar?id=-1").get_json() == {"error": "no image with id -1"}
    searcher = app.extensions["image_search"].searcher
    for error in (KeyError(3), FileNotFoundError("catalog.sqlite")):  # a bug or a broken index, not "no such id"
        def broken(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(searcher, "similar", broken)
        answer = client.get("/api/search/similar?id=1")
        assert answer.status_code == 500 and answer.get_json() == {"error": "internal error"}


def test_flat_search_settings_fill_the_web_configs_search_config(index_dir):
    config = WebConfig.from_mapping({"index": str(index_dir), "max_k": 5, "text_cache_size": 7})
    assert (config.search.max_k, config.search.text_cache_size, config.search.max_query_chars) == (5, 7, 1000)
    assert WebConfig().search.max_k == 100 and WebConfig.from_mapping({}).search == WebConfig().search
    client = create_app(index=str(index_dir), max_k=5, max_query_chars=10).test_client()
    assert client.get("/api/search?q=red&k=5").status_code == 200
    assert "k must be between 1 and 5" in client.get("/api/search?q=red&k=6").get_json()["error"]
    assert "the limit is 10" in client.get("/api/search?q=a red circle!").get_json()["error"]


def test_image_metadata_thumbnail_and_original(client, index_dir):
    info = client.get("/api/images/2").get_json()
    assert info == {"id": 2, "image": PAIRS[2][0], "width": 48, "height": 48, "captions": list(PAIRS[2][1]),
                    "thumbnail": "/thumb/2", "url": "/image/2"}
    thumb = client.get("/thumb/2")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg" and thumb.headers["ETag"]
    assert "max-age" in thumb.headers["Cache-Control"]
    assert Image.open(io.BytesIO(thumb.data)).format == "JPEG"
    assert len(list((index_dir.parent / f".{index_dir.name}.thumbnails").glob("*.jpg"))) >= 1  # cached on disk
    again = client.get("/thumb/2", headers={"If-None-Match": thumb.headers["ETag"]})
    assert again.status_code == 304
    original = client.get("/image/2")
    assert original.status_code == 200 and original.data == (index_dir.parent / "images" / PAIRS[2][0]).read_bytes()


def test_health(client):
    body = client.get("/api/health").get_json()
    assert body["status"] == "ok" and body["images"] == 30 and body["captions"] == 90 and "local-dir:" in body["model"]


def test_page_renders(client):
    page = client.get("/")
    assert page.status_code == 200 and b'id="q"' in page.data and b"30 images" in page.data
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("method, url, kwargs, status, message", [
    ("get", "/api/search?q=", {}, 400, "empty text query"),
    ("get", "/api/search?q=" + "x" * 1001, {}, 400, "the limit is 1000"),
    ("get", "/api/search?q=cat&k=many", {}, 400, "k must be an integer"),
    ("get", "/api/search?q=cat&k=1000", {}, 400, "k must be between 1 and 100"),
    ("get", "/api/search?q=cat&offset=-1", {}, 400, "offset must be between"),
    ("post", "/api/search/image", {"data": {}}, 400, "no file in multipart field 'image'"),
    ("post", "/api/search/image", {"data": {"image": (io.BytesIO(b"%PDF-1.4 hello"), "doc.pdf")}}, 400,
     "not an image file"),
    ("post", "/api/search/image", {"data": {"image": (io.BytesIO(png_bytes()[:60]), "cut.png")}}, 400,
     "cannot decode"),
    ("post", "/api/search/image", {"data": {"image": (io.BytesIO(b""), "empty.png")}}, 400, "empty file"),
    ("post", "/api/search/image", {"data": {"image": (io.BytesIO(png_bytes()), "a.png"), "target": "x"}}, 400,
     "target must be images or captions"),
    ("get", "/api/images/12345", {}, 404, "no image with id 12345"),
    ("get", "/api/nothing-here", {}, 404, "not found"),
    ("post", "/api/health", {}, 405, "not allowed"),
])
def test_api_errors_are_json(client, method, url, kwargs, status, message):
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status and response.is_json, response.data
    assert message in response.get_json()["error"]


def test_upload_limit_gives_413(client):
    big = io.BytesIO(b"\0" * (1024 * 1024 + 10))
    response = client.post("/api/search/image", data={"image": (big, "big.png")})
    assert response.status_code == 413 and "error" in response.get_json()


def test_decompression_bomb_is_refused(client):
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")  # 144 megapixels in a few kB
    response = client.post("/api/search/image", data={"image": (io.BytesIO(buffer.getvalue()), "bomb.png")})
    assert response.status_code == 400 and "over the limit" in response.get_json()["error"]


def test_files_are_served_by_id_only(client):
    for url in ("/thumb/999", "/image/999", "/image/../k.json", "/thumb/-1", "/image/abc"):
        assert client.get(url).status_code == 404


def test_missing_image_file_is_404(tmp_path, index_dir):
    app = create_app(WebConfig(index=index_dir, images=tmp_path))  # image root without the files
    assert app.test_client().get("/image/1").status_code == 404
    assert app.test_client().get("/thumb/1").status_code == 404


def test_create_app_errors_and_keyword_config(index_dir, tmp_path):
    with pytest.raises(IndexFormatError, match="not an index"):
        create_app(index=str(tmp_path))
    with pytest.raises(TypeError, match="unknown WebConfig settings: colour"):
        create_app(index=str(index_dir), colour="blue")
    assert create_app(index=str(index_dir)).test_client().get("/api/health").status_code == 200


def test_concurrent_requests_and_repeated_queries_are_cached(app):
    searcher = app.extensions["image_search"].searcher
    calls = []
    original = searcher.encoder.encode_texts
    searcher.encoder.encode_texts = lambda texts: calls.append(list(texts)) or original(texts)
    try:
        errors = []

        def worker(n):
            client = app.test_client()
            for i in range(10):
                response = client.get(f"/api/search?q=shape number {i % 4}&k=5")
                if response.status_code != 200 or len(response.get_json()["results"]) != 5:
                    errors.append(response.status_code)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        searcher.encoder.encode_texts = original
    assert errors == []
    assert sorted(map(tuple, calls)) == [(f"shape number {i}",) for i in range(4)]  # each text encoded once


def test_main_thread_runner_runs_calls_on_the_main_thread():
    from web.main_thread import MainThreadRunner

    runner, stop, seen, errors = MainThreadRunner(), threading.Event(), [], []

    def request_thread():
        seen.append(runner(lambda: threading.current_thread() is threading.main_thread()))
        try:
            runner(lambda: 1 / 0)
        except ZeroDivisionError:
            errors.append("raised in the caller")
        stop.set()

    threading.Thread(target=request_thread).start()
    runner.run_forever(stop)
    assert seen == [True] and errors == ["raised in the caller"]
