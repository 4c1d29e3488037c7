"""Mirrors and proxies: "is the hub reachable" asks the endpoint huggingface_hub will download from (HF_ENDPOINT),
through the same HTTP client and so the same proxy settings, in a fresh process (the variables are read at import)."""
import http.server
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
