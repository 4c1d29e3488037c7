"""`indexer build --engine ray` against the local engine on photo-sized JPEGs, side by side in one run.

    python -m benchmarks.scale_ray                 # 2,048 photos 1024x768, ViT-B-32 (random weights), 2 runs each
    python -m benchmarks.scale_ray --n 256 --repeats 1 --two-nodes

Each run is the real CLI in a child process (start-up, model load, Ray start-up and the index swap included), the
engines alternating; the table gives median images/s and the ratio ray / local (target: >= 0.85 on this 2-core
machine). --two-nodes also builds on a two-node Ray cluster on loopback (`ray start --head` + `ray start --address`,
one CPU each) and checks that its index equals the local one (same catalog, vectors within 1e-5).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, photo_like_images

ROOT = Path(__file__).resolve().parents[1]


def build(images: Path, out: Path, model: str, *extra: str, env: dict | None = None) -> float:
    """Seconds for one `python -m indexer build` of the folder (exit status checked)."""
    import os

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", str(images),
                           "--out", str(out), "--model", model, "--quiet", *extra], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"build {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return seconds


def same_index(a: Path, b: Path) -> float:
    """Largest vector difference between two indexes whose catalogs must be equal (SystemExit otherwise)."""
    import sqlite3

    def rows(index):
        with sqlite3.connect(index / "catalog.sqlite") as db:
            return db.execute("SELECT * FROM images ORDER BY id").fetchall()

    if rows(a) != rows(b):
        raise SystemExit(f"{a} and {b} have different catalogs")
    return float(np.abs(np.load(a / "image_vectors.npy") - np.load(b / "image_vectors.npy")).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--n", type=int, default=2048, help="photos")
    parser.add_argument("--size", default="1024x768", help="photo size WxH")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine (median)")
    parser.add_argument("--two-nodes", action="store_true", help="also build on a two-node cluster on loopback")
    parser.add_argument("--work", type=Path, default=None, help="keep photos and model here (default: temporary)")
    args = parser.parse_args()

    from search.encoders import EncoderSpec, create_encoder
    from search.openclip.local_dir import save_local_dir

    work = args.work or Path(tempfile.mkdtemp(prefix="scale-ray-"))
    size = tuple(int(v) for v in args.size.split("x"))
    photos = photo_like_images(work / "photos", args.n, size)
    model_dir = work / "model"
    if not (model_dir / "open_clip_config.json").is_file():  # random weights drawn once, loaded like real ones
        save_local_dir(create_encoder(EncoderSpec.from_args(args.model, "none"), "torch"), model_dir)
    model = f"local-dir:{model_dir}"
    create_encoder(EncoderSpec.from_args(model, None))  # the ONNX export, made once before anything is timed

    seconds = {"local": [], "ray": []}
    for _ in range(args.repeats):
        seconds["local"].append(build(photos[0].parent, work / "local", model))
        seconds["ray"].append(build(photos[0].parent, work / "ray", model, "--engine", "ray"))
    difference = same_index(work / "local", work / "ray")

    print(f"{machine()}; {args.model} (random weights) on ONNX Runtime; {args.n} photo-like {args.size} JPEGs; "
          f"median of {args.repeats} CLI runs each")
    print(f"{'engine':<28}{'seconds':>9}{'images/s':>10}{'vs local':>10}")
    local = statistics.median(seconds["local"])
    rows = [("local (threads + ONNX)", local), ("ray (local Ray, 1 actor)", statistics.median(seconds["ray"]))]
    if args.two_nodes:
        sys.path.insert(0, str(ROOT))
        from tests.ray_helpers import start_cluster, stop_cluster

        cluster = start_cluster(nodes=2)
        try:
            two = build(photos[0].parent, work / "two-nodes", model, "--engine", "ray", "--ray-address",
                        cluster.address, env=cluster.env)
        finally:
            stop_cluster(cluster)
        rows.append(("ray (2 nodes x 1 CPU, loopback)", two))
        difference = max(difference, same_index(work / "local", work / "two-nodes"))
    for name, value in rows:
        print(f"{name:<28}{value:>9.1f}{args.n / value:>10.1f}{local / value:>9.2f}x")
    print(f"every index equals the local one: same catalog, vectors within {difference:.1e}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
