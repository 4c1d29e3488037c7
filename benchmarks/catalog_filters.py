"""Filters, keyword search and filtered vector search at scale (issue 13 items 3, 4): what each costs on a synthetic
100k-image catalog (5 captions an image, folders, splits, sizes, dates), against a plain vector query of the same
run (exact Flat and a tuned IVF over 100k random 512-d unit vectors), medians of repeated runs.

    python -m benchmarks.catalog_filters                  # 100k images
    python -m benchmarks.catalog_filters --images 20000 --repeat 30
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from search.catalog import Catalog, CatalogWriter, FileInfo
from search.query import Filters
from search.vector_index import VectorIndex

# caption words: a Zipf-Mandelbrot law over 5,000 words (p ∝ 1 / (rank + 30)), so that, as in COCO's captions, the
# most frequent content word ("man" there, "dog" here) is in about a quarter of the images and most words are rare
WORDS = ("dog cat beach snow red blue ball tree car boat sunset river house child man woman bike street table "
         "pizza horse train plane kite surf sky grass water field road bus").split()
VOCABULARY = WORDS + [f"w{rank:04d}" for rank in range(len(WORDS), 5000)]
WEIGHTS = [1 / (rank + 30) for rank in range(len(VOCABULARY))]
FILLER = ("a", "the", "on", "of", "with", "in")
DIM = 512


def make_catalog(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    writer = CatalogWriter(path)
    for i in range(n):
        folder = f"{rng.choice(('holiday', 'work', 'family', 'misc'))}/{2010 + i % 15}/{rng.randrange(100):02d}"
        captions = [" ".join(rng.choices(VOCABULARY, WEIGHTS, k=8) + rng.choices(FILLER, k=3)) for _ in range(5)]
        taken = 1_262_304_000 + rng.randrange(15 * 365 * 86400)
        writer.add(f"{folder}/{rng.choice(WORDS)}_{i:07d}.jpg", rng.randrange(200, 5000), rng.randrange(200, 5000),
                   captions, FileInfo(1, 1, f"{i:040x}", taken), rng.choice(("train", "val", "test", "restval")))
    writer.close()


def median_ms(fn, repeat: int) -> float:
    fn()  # warm: pages of the file, SQLite's statement cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "catalog.sqlite"
        started = time.perf_counter()
        make_catalog(path, args.images)
        print(f"catalog of {args.images:,} images ({5 * args.images:,} captions) written with its keyword index in "
              f"{time.perf_counter() - started:.1f} s ({path.stat().st_size / 1e6:.0f} MB)")
        catalog = Catalog(path)
        vectors = np.random.default_rng(0).normal(size=(args.images, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        query = vectors[:1] + 0.1 * np.random.default_rng(1).normal(size=(1, DIM)).astype(np.float32)
        flat = VectorIndex.build(vectors, "Flat")
        flat.vectors = vectors
        ivf = VectorIndex.build(vectors, f"IVF{max(16, int(4 * args.images ** 0.5))},Flat")
        ivf.vectors = vectors
        ivf.set_params({"nprobe": 16})
        baseline = {"Flat": median_ms(lambda: flat.search(query, 10), args.repeat),
                    "IVF": median_ms(lambda: ivf.search(query, 10), args.repeat)}
        print(f"baseline: plain vector query k=10: Flat {baseline['Flat']:.2f} ms, IVF (nprobe 16) "
              f"{baseline['IVF']:.2f} ms")
        cases = {
            "folder (1 of 6000)": Filters(path_prefix="holiday/2012/07/"),
            "folder (1 of 60)": Filters(path_prefix="holiday/2012/"),
            "split=test": Filters(split="test"),
            "one year": Filters(taken_after=1_420_070_400, taken_before=1_451_606_399),
            "min_width 4000": Filters(min_width=4000),
            "folder+split+year": Filters(path_prefix="family/", split="val", taken_after=1_420_070_400,
                                         taken_before=1_451_606_399),
            "min_width 300 (most)": Filters(min_width=300),
        }
        print(f"{'filter':24} {'ids':>8} {'filter_ids':>11} {'Flat k=10':>10} {'IVF k=10':>10}   (ms; x plain)")
        for name, filters in cases.items():
            ids = catalog.filter_ids(filters)
            cost = median_ms(lambda: catalog.filter_ids(filters), args.repeat)
            on_flat = median_ms(lambda: flat.search(query, 10, allowed=ids), args.repeat)
            on_ivf = median_ms(lambda: ivf.search(query, 10, allowed=ids), args.repeat)
            print(f"{name:24} {len(ids):8,} {cost:11.2f} {on_flat:5.2f} ({on_flat / baseline['Flat']:.2f}x) "
                  f"{on_ivf:5.2f} ({on_ivf / baseline['IVF']:.2f}x)")
        allowed = catalog.filter_ids(cases["folder (1 of 60)"])
        for text in ("dog", "w0300", "dog on the beach at sunset", "w0300 w1200 w4000", "zebra"):
            plain = median_ms(lambda: catalog.keyword_images(text, 100), args.repeat)
            filtered = median_ms(lambda: catalog.keyword_images(text, 100, allowed=allowed), args.repeat)
            captions = median_ms(lambda: catalog.keyword_captions(text, 100), args.repeat)
            matches = len(catalog.keyword_images(text, args.images))
            print(f"keyword {text!r:30}: {matches:6,} images; top 100 {plain:6.2f} ms, in 1 folder of 60 "
                  f"{filtered:6.2f} ms; captions {captions:6.2f} ms")
        print(f"taken() of 100 ids for sorting by date: "
              f"{median_ms(lambda: catalog.taken(range(0, args.images, args.images // 100)), args.repeat):.2f} ms")


if __name__ == "__main__":
    main()
