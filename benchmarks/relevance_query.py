"""What relevance features cost: a filtered, hybrid, deduplicated query with a relevance cutoff against a plain vector
query, on one index of 100k images (issue 13's target: at most 1.5× the plain query).

    python -m benchmarks.relevance_query                  # 100k images, ~2 minutes
    python -m benchmarks.relevance_query --images 20000   # quicker

The index is synthetic but built through the real writer (catalog, FTS5 keyword index, calibration, automatic FAISS
choice): each image has one caption of 6–10 words drawn from a 2,000-word vocabulary (Zipf-like), a path in one of
100 folders, a date; its vector is the normalised sum of its words' vectors plus noise, so text queries and keyword
queries agree the way they do with a real model. Queries are encoded by the same word-vector rule (cached by the
Searcher like any text query), so both sides time retrieval, not a model. Each query is timed end to end through
`Searcher.run` (filter → FAISS with an ID selector, FTS5, rank fusion, relevance, cutoff, dedupe, hits from the
catalog); medians over the same queries in alternating order, all in one run.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from benchmarks.common import machine
from indexer.writer import IndexWriter
from search.catalog import FileInfo
from search.encoders import Encoder, EncoderSpec
from search.manifest import Manifest
from search.query import Filters, Query, Term
from search.searcher import Searcher
from search.store import open_index

DIM = 512
VOCABULARY = 2000
FOLDERS = 100
TARGET_RATIO = 1.5


class WordVectorEncoder(Encoder):
    """Texts → the normalised sum of their words' fixed random vectors (the benchmark's stand-in for a model)."""

    spec = EncoderSpec("benchmark", "word-vectors", None)
    dim = DIM

    def __init__(self, words: list[str], vectors: np.ndarray):
        self.lookup = dict(zip(words, vectors))

    @property
    def fingerprint(self) -> str:
        return "word-vectors-v1"

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        raise NotImplementedError

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = np.stack([sum(self.lookup.get(w, 0) for w in text.lower().split()) + 1e-6 for text in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def make_collection(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = [f"w{hashlib.sha1(str(i).encode()).hexdigest()[:6]}" for i in range(VOCABULARY)]
    word_vectors = rng.standard_normal((VOCABULARY, DIM)).astype(np.float32)
    popularity = 1.0 / np.arange(1, VOCABULARY + 1) ** 0.8
    popularity /= popularity.sum()
    return rng, words, word_vectors, popularity


def build(out: Path, n: int) -> WordVectorEncoder:
    rng, words, word_vectors, popularity = make_collection(n)
    encoder = WordVectorEncoder(words, word_vectors)
    with IndexWriter(out, overwrite=True, dim=DIM) as writer:
        for i in range(n):
            chosen = rng.choice(VOCABULARY, size=int(rng.integers(6, 11)), replace=False, p=popularity)
            caption = " ".join(words[j] for j in chosen)
            vector = word_vectors[chosen].sum(0) + 2.0 * rng.standard_normal(DIM).astype(np.float32)
            vector /= np.linalg.norm(vector)
            text_vector = encoder.encode_texts([caption])[0]
            file = FileInfo(1000, 0, "", taken=int(1.5e9 + rng.integers(0, 3e8)))
            writer.add(f"folder{i % FOLDERS:03d}/img{i:07d}.jpg", (640, 480), [caption], vector, text_vector[None],
                       file, split="test")
            if i % 20000 == 19999:
                writer.checkpoint(i + 1, [])
        manifest = Manifest(encoder=encoder.spec, fingerprint=encoder.fingerprint, dim=DIM, n_images=writer.n_images,
                            n_captions=writer.n_captions, source={"format": "synthetic"})
        writer.commit(manifest)
    return encoder


def query_texts(searcher: Searcher, filters: Filters, n: int) -> list[str]:
    """The first five words of captions of images the filters admit: queries that have relevant answers."""
    allowed = searcher.index.catalog.filter_ids(filters)
    chosen = np.random.default_rng(1).choice(allowed, size=n, replace=False)
    captions = searcher.index.catalog.captions_of(chosen.tolist())
    return [" ".join(captions[int(i)][0].split()[:5]) for i in chosen]


def timed(searcher: Searcher, query: Query) -> float:
    tick = time.perf_counter()
    searcher.run(query)
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "index"
        tick = time.perf_counter()
        encoder = build(out, args.images)
        index = open_index(out)
        print(f"built {args.images} images in {time.perf_counter() - tick:.0f} s; image index "
              f"{index.manifest.image_factory}")
        searcher = Searcher(index, encoder)
        filters = Filters(path_prefix="folder0", taken_after=1.55e9)  # folders folder000–folder009 (10 %), 5/6 dates
        texts = query_texts(searcher, filters, args.queries)
        plain = [Query((Term(text=t),), k=10) for t in texts]
        full = [Query((Term(text=t),), k=10, cutoff="auto", filters=filters, mode="hybrid", dedupe=True)
                for t in texts]
        for query in plain + full:  # warm: text cache, filter cache, pages of the files
            searcher.run(query)
        plain_times, full_times = [], []
        for a, b in zip(plain, full):
            first, second = (a, b) if len(plain_times) % 2 == 0 else (b, a)
            times = {id(first): timed(searcher, first), id(second): timed(searcher, second)}
            plain_times.append(times[id(a)])
            full_times.append(times[id(b)])
        kept = [len(searcher.run(q).hits) for q in full]
        plain_ms, full_ms = statistics.median(plain_times) * 1e3, statistics.median(full_times) * 1e3
        ratio = full_ms / plain_ms
        print(f"plain vector query:                           median {plain_ms:.2f} ms")
        print(f"filtered + hybrid + deduped + cutoff=auto:    median {full_ms:.2f} ms "
              f"(hits kept: median {statistics.median(kept):.0f} of 10)")
        print(f"ratio {ratio:.2f}x (target ≤ {TARGET_RATIO}x): {'met' if ratio <= TARGET_RATIO else 'MISSED'}")


if __name__ == "__main__":
    main()
