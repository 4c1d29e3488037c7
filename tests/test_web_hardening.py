"""The server as a newcomer and a reviewer first meet it: relative paths, headers, the admin endpoint, favicon,
and an index without captions."""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from web import create_app
from web.config import ADMIN_TOKEN_ENV, WebConfig

from .helpers import build_photo_index, build_test_index, make_pairs

ROOT = Path(__file__).resolve().parents[1]
PAIRS = make_pairs(12, seed=41)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("hardening"), PAIRS, tiny_model_spec)


def test_relative_index_and_images_paths_serve_every_thumbnail(index_dir, monkeypatch, tmp_path):
    """Flask resolves a relative send_file path against the package folder: every path must be absolute first."""
    monkeypatch.chdir(index_dir.parent)
    app = create_app(index="index", images="images")
    monkeypatch.chdir(tmp_path)  # a server's working directory is no base for anything it serves
    client = app.test_client()
    for image_id in range(len(PAIRS)):
        thumb = client.get(f"/thumb/{image_id}")
        assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg" and thumb.data[:2] == b"\xff\xd8"
        assert client.get(f"/image/{image_id}").status_code == 200
    # thumbnails are cached beside the index, outside the directory an update swaps
    assert len(list((index_dir.parent / ".index.thumbnails").glob("*.jpg"))) == len(PAIRS)
    assert not (index_dir / ".thumbnails").exists()


def test_missing_image_files_are_logged_not_silent(index_dir, tmp_path, caplog):
    app = create_app(index=index_dir, images=tmp_path)  # an image root that holds none of the files
    with caplog.at_level("WARNING", logger="web"):
        assert app.test_client().get("/thumb/0").status_code == 404
    assert any(PAIRS[0][0] in r.getMessage() and "not found" in r.getMessage() for r in caplog.records)


def test_security_headers_and_no_inline_script(index_dir):
    client = create_app(index=index_dir).test_client()
    for url in ("/", "/api/health", "/thumb/0", "/api/search?q="):
        response = client.get(url)
        csp = response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = client.get("/").get_data(as_text=True)
    assert all(re.search(r"\bsrc=", tag) for tag in re.findall(r"<script[^>]*>", page))  # no inline <script>
    assert not re.search(r"\son[a-z]+\s*=", page) and "style=" not in page  # no inline handlers or styles
    assert "<script>" not in page


def test_favicon(index_dir):
    client = create_app(index=index_dir).test_client()
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.mimetype == "image/svg+xml" and b"<svg" in icon.data
    assert 'rel="icon"' in client.get("/").get_data(as_text=True)


def test_reload_needs_a_token_beyond_loopback(index_dir, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    client = create_app(index=index_dir).test_client()
    assert client.post("/api/reload").status_code == 200  # the test client calls from 127.0.0.1
    remote = client.post("/api/reload", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert remote.status_code == 403 and "admin token" in remote.get_json()["error"]

    client = create_app(WebConfig(index=index_dir, admin_token="s3cret")).test_client()
    assert client.post("/api/reload").status_code == 401  # with a token set, loopback must show it too
    assert client.post("/api/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/api/reload", headers={"Authorization": "Bearer s3cret"},
                     environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert ok.status_code == 200 and ok.get_json()["reloaded"] is False

    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    client = create_app(index=index_dir).test_client()
    assert client.post("/api/reload", headers={"Authorization": "Bearer from-env"}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_listening_beyond_loopback_without_a_token_warns(index_dir):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != ADMIN_TOKEN_ENV}
    process = subprocess.Popen([sys.executable, "-m", "web", "--index", str(index_dir), "--host", "0.0.0.0",
                                "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
                break
            except OSError:
                assert process.poll() is None, process.stderr.read()
                time.sleep(0.1)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    warning = [line for line in err.splitlines() if "without an admin token" in line]
    assert warning and warning[0].startswith("WARNING") and ADMIN_TOKEN_ENV in warning[0]


def test_caption_search_on_an_index_without_captions_says_so(tmp_path, tiny_model_spec):
    photos, index = build_photo_index(tmp_path, PAIRS[:4], tiny_model_spec)
    client = create_app(index=index).test_client()
    with (photos / PAIRS[0][0]).open("rb") as handle:
        answer = client.post("/api/search/image", data={"image": (handle, "q.png"), "target": "captions"})
    assert answer.status_code == 400 and "no captions" in answer.get_json()["error"]
    page = client.get("/").get_data(as_text=True)
    assert re.search(r'value="captions"\s+disabled', page) and "this index has none" in page

    cli = subprocess.run([sys.executable, "-m", "search", "query", "--index", str(index), "--image",
                          str(photos / PAIRS[0][0]), "--target", "captions"], cwd=ROOT, capture_output=True,
                         text=True)
    assert cli.returncode == 1 and cli.stderr.strip().startswith("error: ") and "no captions" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
