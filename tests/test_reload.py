"""The web app keeps answering while its index is updated, then switches to the new version atomically."""
import json
import threading
import time

from indexer.cli import main as indexer_main
from web import create_app

from .helpers import draw, make_pairs, write_images

PAIRS = make_pairs(16, seed=31)


def test_queries_during_an_update_never_fail_and_then_see_the_new_index(tmp_path, tiny_model_spec,
                                                                         trained_model_dir):
    photos = write_images(tmp_path / "photos", PAIRS[:10])
    index = tmp_path / "index"
    assert indexer_main(["build", "--format", "folder", "--images", str(photos), "--out", str(index), "--model",
                         tiny_model_spec, "--quiet"]) == 0
    app = create_app(index=str(index))
    failures, answered, stop = [], [], threading.Event()

    def user(n):
        client = app.test_client()
        while not stop.is_set() and len(answered) < 2000:
            for url in (f"/api/search?q=shape {n}&k=5", "/api/search/similar?id=0&k=3", "/api/health",
                        "/thumb/1"):
                response = client.get(url)
                (answered if response.status_code == 200 else failures).append((url, response.status_code))

    users = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for thread in users:
        thread.start()
    try:
        for name, _, attrs in PAIRS[10:]:
            draw(*attrs).save(photos / f"added_{name}")
        assert indexer_main(["update", "--index", str(index), "--quiet"]) == 0
        time.sleep(1.2)  # the app looks for a new version at most once a second
        client = app.test_client()
        for _ in range(50):
            if client.get("/api/health").get_json()["images"] == 16:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in users:
            thread.join()
    assert failures == [] and len(answered) > 20
    assert client.get("/api/health").get_json()["images"] == 16
    assert len(client.get("/api/search?q=anything&k=20").get_json()["results"]) == 16

    # an explicit reload: nothing new → reloaded false; a new version → true
    assert client.post("/api/reload").get_json() == {"reloaded": False, "images": 16, "captions": 0}
    (photos / f"added_{PAIRS[10][0]}").unlink()
    assert indexer_main(["update", "--index", str(index), "--quiet"]) == 0
    assert client.post("/api/reload").get_json()["reloaded"] is True
    assert client.get("/api/health").get_json()["images"] == 15

    # a new version the app cannot use (built with other weights) is refused; the current one keeps serving
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["encoder"]["model"] = f"local-dir:{trained_model_dir}"
    (index / "manifest.json").write_text(json.dumps(manifest))
    response = client.post("/api/reload")
    assert response.status_code == 409 and "kept the current index" in response.get_json()["error"]
    assert client.get("/api/search?q=red&k=3").status_code == 200


def test_loopback_load_during_an_update_against_the_real_server(tmp_path, tiny_model_spec):
    """Bounded load over loopback HTTP against `python -m web` while `indexer update` runs in another process."""
    import socket
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    photos = write_images(tmp_path / "photos", PAIRS[:10])
    index = tmp_path / "index"
    assert indexer_main(["build", "--format", "folder", "--images", str(photos), "--out", str(index), "--model",
                         tiny_model_spec, "--quiet"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "web", "--index", str(index), "--port", str(port)], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    failures, answered, stop = [], [], threading.Event()

    def user(n):
        while not stop.is_set() and len(answered) < 3000:
            for url in (f"/api/search?q=shape%20{n}%20{len(answered)}&k=5", "/api/search/similar?id=1&k=3"):
                try:
                    with urllib.request.urlopen(base + url, timeout=30) as response:
                        answered.append(response.status)
                except Exception as exc:  # any failed request fails the test
                    failures.append((url, repr(exc)))

    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/api/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        users = [threading.Thread(target=user, args=(n,)) for n in range(3)]
        for thread in users:
            thread.start()
        for name, _, attrs in PAIRS[10:]:
            draw(*attrs).save(photos / f"added_{name}")
        update = subprocess.run([sys.executable, "-m", "indexer", "update", "--index", str(index), "--quiet"],
                                cwd=root, capture_output=True, text=True, timeout=120)
        assert update.returncode == 0, update.stderr
        images = 0
        for _ in range(60):
            images = json.loads(urllib.request.urlopen(base + "/api/health", timeout=5).read())["images"]
            if images == 16:
                break
            time.sleep(0.1)
        stop.set()
        for thread in users:
            thread.join()
    finally:
        stop.set()
        server.terminate()
        server.wait(10)
    assert failures == [] and len(answered) > 10 and images == 16


def test_one_failing_request_does_not_take_the_server_down(tmp_path, tiny_model_spec):
    photos = write_images(tmp_path / "photos", PAIRS[:4])
    index = tmp_path / "index"
    assert indexer_main(["build", "--format", "folder", "--images", str(photos), "--out", str(index), "--model",
                         tiny_model_spec, "--quiet"]) == 0
    app = create_app(index=str(index))
    searcher = app.extensions["image_search"].searcher
    real = searcher.run
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk hiccup")
        return real(*args, **kwargs)

    searcher.run = flaky
    client = app.test_client()
    failed = client.get("/api/search?q=red")
    assert failed.status_code == 500 and failed.get_json() == {"error": "internal error"}
    assert client.get("/api/search?q=red").status_code == 200
