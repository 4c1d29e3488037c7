"""The build pipeline: samples → (decode + preprocess in worker threads) → encoder → IndexWriter.

A plain loop joins the three: worker threads decode and preprocess a bounded window of images ahead of the model
(PIL and torchvision release the GIL for most of that work), the main thread encodes full batches and hands rows to
the writer. Unreadable images are skipped with a one-line reason and listed in the manifest.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from search.encoders import Encoder
from search.errors import DatasetError, ImageReadError
from search.images import DEFAULT_MAX_MEGAPIXELS, load_image
from search.index_choice import IndexOptions
from search.manifest import Manifest

from .readers import Sample
from .writer import IndexWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    batch_size: int = 64
    workers: int = max(1, os.cpu_count() or 1)
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    index: IndexOptions = IndexOptions()
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class BuildReport:
    out: Path
    n_images: int
    n_captions: int
    skipped: tuple
    seconds: float
    encode_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"indexed {self.n_images} images and {self.n_captions} captions into {self.out}; skipped "
                f"{len(self.skipped)}; {self.seconds:.1f} s ({self.images_per_second:.1f} images/s, model "
                f"{self.encode_seconds:.1f} s)")


@dataclass(frozen=True)
class LoadedImage:
    sample: Sample
    size: tuple[int, int] | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


def prefetch(pool: Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """`map(fn, items)` on a pool, in order, with at most `ahead` items in flight (bounded memory)."""
    items = iter(items)
    window = deque(pool.submit(fn, item) for item in islice(items, ahead))
    while window:
        result = window.popleft().result()
        for item in islice(items, 1):
            window.append(pool.submit(fn, item))
        yield result


def batched(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


def build_index(samples: Sequence[Sample], images_root: Path, encoder: Encoder, out: Path,
                config: BuildConfig = BuildConfig(), source: dict | None = None) -> BuildReport:
    """Encode every readable sample and write a complete index to `out` atomically."""
    images_root = Path(images_root)

    def load(sample: Sample) -> LoadedImage:
        try:
            image = load_image(images_root / sample.image, config.max_megapixels, encoder.image_size)
            return LoadedImage(sample, image.info["source_size"], encoder.preprocess_image(image))
        except ImageReadError as exc:
            return LoadedImage(sample, error=str(exc))

    started = time.perf_counter()
    encode_seconds = 0.0
    skipped: list[dict] = []
    # route log lines around the progress bar only when there is one (the redirect replaces the root's handlers)
    redirect = logging_redirect_tqdm() if config.progress else contextlib.nullcontext()
    with redirect, IndexWriter(out, config.overwrite, encoder.dim) as writer, \
            ThreadPoolExecutor(config.workers, thread_name_prefix="decode") as pool, \
            tqdm(total=len(samples), unit="img", desc="encoding", disable=not config.progress) as bar:
        for batch in batched(prefetch(pool, load, samples, ahead=2 * config.batch_size), config.batch_size):
            good = [item for item in batch if item.error is None]
            for item in batch:
                if item.error is not None:
                    log.warning("skipped %s", item.error)
                    skipped.append({"path": item.sample.image, "reason": item.error})
            if good:
                tick = time.perf_counter()
                image_vectors = encoder.encode_pixels(np.stack([item.pixels for item in good]))
                texts = [caption for item in good for caption in item.sample.captions]
                text_vectors = encoder.encode_texts(texts)
                encode_seconds += time.perf_counter() - tick
                offset = 0
                for item, image_vector in zip(good, image_vectors):
                    n = len(item.sample.captions)
                    writer.add(item.sample.image, item.size, item.sample.captions, image_vector,
                               text_vectors[offset:offset + n])
                    offset += n
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped), refresh=False)
        if writer.n_images == 0:
            reason = skipped[0]["reason"] if skipped else "no samples"
            raise DatasetError(f"none of the {len(samples)} images could be read (first: {reason})")
        manifest = Manifest(
            encoder=encoder.spec, fingerprint=encoder.fingerprint, dim=encoder.dim, n_images=writer.n_images,
            n_captions=writer.n_captions, source=dict(source or {}), skipped=tuple(skipped),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), precision=encoder.precision)
        manifest = writer.commit(manifest, config.index)
    seconds = time.perf_counter() - started
    return BuildReport(Path(out), manifest.n_images, manifest.n_captions, tuple(skipped), seconds, encode_seconds)
