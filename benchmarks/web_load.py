"""The JSON API under load: text queries end to end (HTTP, encode, search, JSON) against the encode time alone.

    python -m benchmarks.web_load                 # builds a ViT-B-32 (random weights) index of 256 photos first
    python -m benchmarks.web_load --index INDEX   # an existing index

Serves the app on loopback with `python -m web` and with gunicorn (sync workers answer on their main thread, the
gthread worker on other threads); clients keep their connections open and send distinct queries (no cache hits). Reports p50/p99
latency and requests/s for 1 and 4 concurrent clients, per runtime (--runtimes torch,onnx): the ratio column is
the ONNX Runtime server's p50 over the torch server's, measured in the same run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from benchmarks.common import ROOT, machine, percentiles, photo_like_images
from benchmarks.text_encoding import captions
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import Sample
from search.encoders import create_encoder
from search.openclip.local_dir import save_local_dir
from search.store import open_index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int, queries: list[str], latencies: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for q in queries:
        tick = time.perf_counter()
        conn.request("GET", "/api/search?" + urllib.parse.urlencode({"q": q, "k": 10}))
        response = conn.getresponse()
        body = response.read()
        latencies.append(time.perf_counter() - tick)
        if response.status != 200 or not json.loads(body)["results"]:
            raise RuntimeError(f"request failed: {response.status} {body[:200]!r}")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=200, help="requests per client count")
    parser.add_argument("--runtimes", default="torch,onnx", help="servers' --runtime values, compared in the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    index = args.index
    if index is None:
        from search.encoders import EncoderSpec

        work = Path(tempfile.mkdtemp(prefix="bench-web-"))
        photos = photo_like_images(work / "photos", 256)
        random_draw = create_encoder(EncoderSpec.from_args("ViT-B-32", "none"))  # saved: the server must load
        folder = save_local_dir(random_draw, work / "model")  # the same weights
        encoder = create_encoder(EncoderSpec.from_args(f"local-dir:{folder}", None), "torch")
        index = work / "index"
        build_index([Sample(p.name) for p in photos], work / "photos", encoder, index, BuildConfig(progress=False))
    else:
        encoder = None

    texts = captions(args.requests * 7, seed=7)
    runtimes = args.runtimes.split(",")
    encode_p50 = {}
    for runtime in runtimes:
        encoder = create_encoder(open_index(index).manifest.encoder, runtime)
        encode_times = []
        for text in texts[:args.requests]:
            tick = time.perf_counter()
            encoder.encode_texts([text])
            encode_times.append(time.perf_counter() - tick)
        encode_p50[runtime] = percentiles(encode_times)[0]
        del encoder

    rows: dict[tuple, dict] = {}
    for runtime in runtimes:
        app = f'web:create_app(index="{index}", runtime="{runtime}")'
        gunicorn = [sys.executable, "-m", "gunicorn", "--timeout", "120", app, "-b"]
        for label, command in (
                ("python -m web (threads; model calls on the main thread)",
                 [sys.executable, "-m", "web", "--index", str(index), "--runtime", runtime, "--port"]),
                ("gunicorn sync, 1 worker", [*gunicorn[:3], "-w", "1", *gunicorn[3:]]),
                ("gunicorn sync, 2 workers", [*gunicorn[:3], "-w", "2", *gunicorn[3:]]),
                ("gunicorn gthread, 1 worker x 4 threads", [*gunicorn[:3], "-w", "1", "--threads", "4",
                                                            *gunicorn[3:]])):
            for clients, *measured in serve_and_load(command, texts[args.requests:], args.requests):
                rows.setdefault((label, clients), {})[runtime] = measured

    print(machine())
    print(f"index {index} ({open_index(index).manifest.n_images} images, {open_index(index).manifest.encoder}); "
          f"{args.requests} distinct text queries per row\n")
    print("text encode alone (same model, in process, main thread): " +
          ", ".join(f"{r} p50 {encode_p50[r]:.1f} ms" for r in runtimes) + "\n")
    base, other = runtimes[0], runtimes[-1]
    print(f"| server | clients | " + " | ".join(f"{r} p50 ms | {r} p99 ms | {r} requests/s" for r in runtimes) +
          f" | {other} p50 / {base} p50 |")
    print("|---|---|" + "---|---|---|" * len(runtimes) + "---|")
    for (label, clients), by_runtime in rows.items():
        cells = " | ".join(f"{p50:.1f} | {p99:.1f} | {rate:.1f}" for p50, p99, rate in
                           (by_runtime[r] for r in runtimes))
        print(f"| {label} | {clients} | {cells} | {by_runtime[other][0] / by_runtime[base][0]:.2f}x |")


def serve_and_load(command: list[str], texts: list[str], requests: int) -> list[tuple]:
    """Start the server (`command` ends with its port option), load it with 1 then 4 clients."""
    port = free_port()
    address = str(port) if command[-1] == "--port" else f"127.0.0.1:{port}"
    server = subprocess.Popen([*command, address], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        for _ in range(4):  # every worker loads its model before answering
            client(port, ["warm up"], [])
        rows = []
        offset = 0
        for clients in (1, 4):
            per_client = requests // clients
            latencies: list[float] = []
            threads = [threading.Thread(target=client, args=(port, texts[offset + i * per_client:
                                                                         offset + (i + 1) * per_client], latencies))
                       for i in range(clients)]
            offset += requests
            tick = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - tick
            p50, p99 = percentiles(latencies)
            rows.append((clients, p50, p99, len(latencies) / elapsed))
        return rows
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
