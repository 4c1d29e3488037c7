"""Shared by the benchmark scripts: machine description, timing statistics, photo-like test images."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}), "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")


def encoding_parser(doc: str, n: int, demo_dir: Path | None, demo_help: str):
    """The arguments every encoding benchmark takes: model, number of photos, batch size, repeats, trained demo."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--n", type=int, default=n, help="photos per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo-dir", type=Path, default=demo_dir, help=demo_help)
    return parser


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 99) * 1000)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def photo_like_images(folder: Path, n: int, size=(640, 480), seed: int = 0) -> list[Path]:
    """JPEGs with smooth gradients, shapes and sensor-like noise: decode cost close to real 640x480 photos."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        w, h = size
        ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(-80, 80, 3)
        base = rng.uniform(40, 200, 3) + ramp + np.linspace(0, 1, h, dtype=np.float32)[:, None, None] * 40
        image = Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))
        pen = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.integers(0, w), rng.integers(0, h)
            r = int(rng.integers(10, 120))
            pen.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.filter(ImageFilter.GaussianBlur(1)).save(path, quality=90)
    return paths
