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


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (IP SAN) and its key, made here: the client trusts it through SSL_CERT_FILE."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "mirror.pem", folder / "mirror.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class _ConnectProxy(http.server.BaseHTTPRequestHandler):
    """An HTTPS proxy as corporate networks run them: CONNECT host:port, then bytes both ways (it never sees inside
    the TLS). It records every tunnel it opened."""

    tunnels: list = []

    def do_CONNECT(self):
        import select

        host, port = self.path.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=30)
        _ConnectProxy.tunnels.append(self.path)
        self.send_response(200, "Connection established")
        self.end_headers()
        ends = [self.connection, upstream]
        try:
            while True:
                ready, _, _ = select.select(ends, [], [], 30)
                if not ready:
                    return
                for end in ready:
                    data = end.recv(65536)
                    if not data:
                        return
                    (upstream if end is self.connection else self.connection).sendall(data)
        finally:
            upstream.close()

    def log_message(self, *args):
        pass


def _serve(server) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"127.0.0.1:{server.server_address[1]}"


def test_a_model_downloads_from_an_https_mirror_through_an_https_proxy(tiny_model_dir, tmp_path):
    """HTTPS_PROXY exercised by a real download: the mirror speaks TLS only, the client reaches it only through a
    CONNECT proxy, and the build still fetches every file and indexes (the reachability check takes the same road)."""
    import ssl

    from .helpers import make_pairs, write_images

    cert, key = _self_signed(tmp_path)
    _Hub.files = {f"test-org/tiny/{f.name}": f.read_bytes() for f in Path(tiny_model_dir).iterdir() if f.is_file()}
    _Hub.asked, _ConnectProxy.tunnels = [], []
    mirror = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    mirror.socket = context.wrap_socket(mirror.socket, server_side=True)
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ConnectProxy)
    mirror_at, proxy_at = _serve(mirror), _serve(proxy)
    try:
        write_images(tmp_path / "photos", make_pairs(4, seed=3))
        clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "HF_HUB_OFFLINE"}
        env = {**clean, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": f"https://{mirror_at}", "HF_HOME": str(tmp_path / "hf"),
               "HTTPS_PROXY": f"http://{proxy_at}", "SSL_CERT_FILE": str(cert)}
        done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", "photos",
                               "--out", "index", "--model", "hf-hub:test-org/tiny", "--runtime", "torch", "--quiet"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert _ConnectProxy.tunnels and set(_ConnectProxy.tunnels) == {mirror_at}  # every request took the proxy
        fetched = {path.rsplit("/", 1)[-1] for method, path in _Hub.asked if method == "GET"}
        assert fetched == {name.rsplit("/", 1)[-1] for name in _Hub.files}

        dead_proxy = f"http://127.0.0.1:{closed_port()}"  # the same mirror behind a proxy that is down: no download
        done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", "photos",
                               "--out", "index2", "--model", "hf-hub:test-org/other", "--quiet"], cwd=tmp_path,
                              env={**env, "HTTPS_PROXY": dead_proxy}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and mirror_at in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        mirror.shutdown()
        proxy.shutdown()
