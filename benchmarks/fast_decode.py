"""Exact (default) vs fast JPEG decoding (`indexer build --fast-decode`): speed, and how far the vectors move.

    python -m benchmarks.fast_decode                          # ViT-B-32, random weights: speed and cosine
    python -m benchmarks.fast_decode --demo-dir demo_data     # also recall@k on the trained demo model

Decode: `load_image` + the model's preprocessing, one thread (what each decoding worker of a build does), on
photo-like 640x480 JPEGs. Pipeline: `indexer build`'s code writing a real index (threads decode ahead of the model).
Cosine: exact vs fast vectors of the same file. Recall: the demo's held-out test images re-saved as 640x480 JPEGs
(upscaled, quality 90) and indexed both ways; the demo's own images (small JPEGs, as generated) give the baseline. Medians over --repeats runs,
exact and fast alternating within each run so machine load affects both alike.
"""
from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import encoding_parser, machine, photo_like_images
from demo.scenes import IMAGE_DIR
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import Sample, read_dataset
from search.evaluation import evaluate
from search.encoders import EncoderSpec, create_encoder
from search.images import load_image
from search.store import open_index

PHOTO_SIZE = (640, 480)
MODES = {"exact (default)": False, "fast (--fast-decode)": True}


def decode_rate(encoder, paths, fast: bool) -> float:
    tick = time.perf_counter()
    for path in paths:
        encoder.preprocess_image(load_image(path, min_side=encoder.image_size if fast else None))
    return len(paths) / (time.perf_counter() - tick)


def build(encoder, root: Path, samples, work: Path, fast: bool, batch_size: int = 64):
    out = Path(tempfile.mkdtemp(dir=work)) / "index"
    tick = time.perf_counter()
    build_index(samples, root, encoder, out, BuildConfig(batch_size=batch_size, progress=False, fast_decode=fast))
    return out, len(samples) / (time.perf_counter() - tick)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def speed_table(args, work: Path) -> None:
    paths = photo_like_images(work / "photos", args.n, PHOTO_SIZE)
    samples = [Sample(p.name) for p in paths]
    encoder = create_encoder(EncoderSpec.from_args(args.model, args.pretrained), batch_size=args.batch_size)
    encoder.fingerprint  # hashed once, outside the timings
    decode_rate(encoder, paths[:8], False)  # warm-up
    decoded = {mode: [] for mode in MODES}
    built = {mode: [] for mode in MODES}
    vectors = {}
    for _ in range(args.repeats):
        for mode, fast in MODES.items():
            decoded[mode].append(decode_rate(encoder, paths, fast))
        for mode, fast in MODES.items():
            out, rate = build(encoder, work / "photos", samples, work, fast, args.batch_size)
            built[mode].append(rate)
            vectors[mode] = np.load(out / "image_vectors.npy")
    base_decode = statistics.median(decoded["exact (default)"])
    base_build = statistics.median(built["exact (default)"])
    print(machine())
    print(f"{args.model} ({args.pretrained}), {args.n} photo-like {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs "
          f"(model input {encoder.image_size} px), batch {args.batch_size}, median of {args.repeats} runs\n")
    print("| decoding | decode + preprocess, 1 thread, images/s | vs exact | build pipeline images/s | vs exact |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        d, b = statistics.median(decoded[mode]), statistics.median(built[mode])
        print(f"| {mode} | {d:.1f} | {d / base_decode:.2f}x | {b:.1f} | {b / base_build:.2f}x |")
    cos = cosines(vectors["exact (default)"], vectors["fast (--fast-decode)"])
    print(f"\ncosine exact vs fast vectors ({args.model}, {args.pretrained} weights): mean {cos.mean():.5f}, "
          f"min {cos.min():.5f}")


def as_photos(samples, images: Path, folder: Path) -> list[Sample]:
    """The samples' images upscaled to PHOTO_SIZE and saved as JPEG (quality 90), as a camera would deliver them."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for sample in samples:
        name = Path(sample.image).with_suffix(".jpg").as_posix()
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(images / sample.image) as image:
            image.convert("RGB").resize(PHOTO_SIZE, Image.BICUBIC).save(folder / name, quality=90)
        photos.append(Sample(name, sample.captions))
    return photos


def recall_table(demo_dir: Path, work: Path) -> None:
    model = demo_dir / "model"
    token = demo_dir / "scenes" / "Flickr8k.token.txt"
    if not (model / "open_clip_config.json").is_file() or not token.is_file():
        print(f"\nno demo data in {demo_dir} (make it with python -m web --demo --prepare-only): recall not "
              f"measured, only the cosine above")
        return
    images = demo_dir / "scenes" / IMAGE_DIR
    test = read_dataset("flickr8k", token, images, "test")
    photos = as_photos(test, images, work / "demo_photos")
    encoder = create_encoder(EncoderSpec.from_args(f"local-dir:{model}", None))
    runs = {"demo images as generated": (images, test, False),
            "640x480 JPEGs, exact (default)": (work / "demo_photos", photos, False),
            "640x480 JPEGs, fast (--fast-decode)": (work / "demo_photos", photos, True)}
    results = {}
    for name, (root, samples, fast) in runs.items():
        out, _ = build(encoder, root, samples, work, fast)
        results[name] = (evaluate(open_index(out)).to_json(), np.load(out / "image_vectors.npy"))
    exact_vectors = results["640x480 JPEGs, exact (default)"][1]
    print(f"\nrecall@k on the demo's test split ({len(test)} images, model {model}, input {encoder.image_size} px):\n")
    print("| images | text→image R@1 / R@5 / R@10 | image→text R@1 / R@5 / R@10 | cosine to exact JPEG vectors "
          "(mean / min) |")
    print("|---|---|---|---|")
    for name, (metrics, vectors) in results.items():
        t, i = metrics["text_to_image"], metrics["image_to_text"]
        cos = cosines(vectors, exact_vectors)
        print(f"| {name} | {t['R@1']:.2f} / {t['R@5']:.2f} / {t['R@10']:.2f} | "
              f"{i['R@1']:.2f} / {i['R@5']:.2f} / {i['R@10']:.2f} | {cos.mean():.5f} / {cos.min():.5f} |")
    exact, fast = results["640x480 JPEGs, exact (default)"][0], results["640x480 JPEGs, fast (--fast-decode)"][0]
    change = ", ".join(f"{direction} R@{k} {fast[key][f'R@{k}'] - exact[key][f'R@{k}']:+.2f}"
                       for direction, key in (("text→image", "text_to_image"), ("image→text", "image_to_text"))
                       for k in (1, 5, 10))
    print(f"\nrecall change fast − exact (points): {change}")


def main() -> None:
    parser = encoding_parser(__doc__, 128, Path("demo_data"), "trained demo (default: demo_data): recall@k exact vs fast")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    try:
        speed_table(args, work)
        recall_table(args.demo_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
