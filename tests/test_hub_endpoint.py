"""Mirrors and proxies: "is the hub reachable" asks the endpoint huggingface_hub will download from (HF_ENDPOINT),
through the same HTTP client and so the same proxy settings, in a fresh process (the variables are read at import)."""
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = "from search.openclip.loading import _hub_reachable, hub_endpoint; print(_hub_reachable(2.0), hub_endpoint())"


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # a mirror's root may well be a 404: it still answers
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


class _Hub(http.server.BaseHTTPRequestHandler):
    """A model hub mirror in the hub's URL layout, /{org}/{repo}/resolve/{revision}/{file}, with the headers
    huggingface_hub reads (ETag, X-Repo-Commit, Content-Length); it records what was asked."""

    files: dict = {}  # "org/repo/file" → bytes
    asked: list = []

    def _answer(self, body: bool) -> None:
        _Hub.asked.append((self.command, self.path))
        parts = self.path.split("?")[0].strip("/").split("/")
        data = _Hub.files.get("/".join(parts[:2] + parts[4:])) if len(parts) >= 5 and parts[2] == "resolve" else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mirror():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def reachable(**env: str) -> tuple[bool, str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120,
                          env={**clean, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr
    answer, endpoint = done.stdout.split()
    return answer == "True", endpoint


def test_the_check_asks_the_mirror_in_hf_endpoint(mirror):
    assert reachable(HF_ENDPOINT=mirror) == (True, mirror)
    dead = f"http://127.0.0.1:{closed_port()}"
    assert reachable(HF_ENDPOINT=dead) == (False, dead)
    assert reachable(HF_ENDPOINT=mirror, HF_HUB_OFFLINE="1")[0] is False


def test_the_check_goes_through_the_proxy_the_download_would_use(mirror):
    dead_proxy = f"http://127.0.0.1:{closed_port()}"
    assert reachable(HF_ENDPOINT=mirror, HTTP_PROXY=dead_proxy, NO_PROXY="")[0] is False  # the proxy is the road
    assert reachable(HF_ENDPOINT=mirror, HTTP_PROXY=dead_proxy, NO_PROXY="127.0.0.1")[0] is True  # bypassed


@pytest.fixture
def hub(tiny_model_dir):
    """The tiny test model published on a loopback mirror as test-org/tiny."""
    _Hub.files = {f"test-org/tiny/{f.name}": f.read_bytes() for f in Path(tiny_model_dir).iterdir() if f.is_file()}
    _Hub.asked = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_model_downloads_through_the_mirror_and_indexes(hub, tmp_path):
    """The real download path: `indexer build --model hf-hub:ORG/REPO` with HF_ENDPOINT set, from another directory,
    fetches the files from the mirror into an empty Hugging Face cache and builds an index a query then uses."""
    from .helpers import make_pairs, write_images

    write_images(tmp_path / "photos", make_pairs(6, seed=9))
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "HF_HUB_OFFLINE"}
    env = {**clean, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", "photos",
                           "--out", "index", "--model", "hf-hub:test-org/tiny", "--runtime", "torch", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["encoder"]["model"] == "hf-hub:test-org/tiny"
    fetched = {path.rsplit("/", 1)[-1] for method, path in _Hub.asked if method == "GET"}
    assert fetched == {name.rsplit("/", 1)[-1] for name in _Hub.files}  # every file came from the mirror
    query = subprocess.run([sys.executable, "-m", "search", "query", "--index", "index", "--text", "a red circle",
                            "--runtime", "torch", "-k", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert query.returncode == 0 and len(query.stdout.splitlines()) == 2, query.stderr


def test_a_dead_mirror_fails_at_once_naming_it(tmp_path):
    from .helpers import make_pairs, write_images

    write_images(tmp_path, make_pairs(2, seed=9))
    dead = f"http://127.0.0.1:{closed_port()}"
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", str(tmp_path),
                           "--out", str(tmp_path / "index"), "--model", "hf-hub:test-org/missing", "--quiet"],
                          env={**clean, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": dead, "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and dead in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
