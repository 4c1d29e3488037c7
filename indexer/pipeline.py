"""The build pipeline: samples → loader (read + decode in worker threads) → encode → IndexWriter.

As in clip-retrieval's runner, a short loop joins the stages: the loader (indexer/loader.py) turns samples into
`Reused | Decoded | Skipped` items a bounded window ahead of the model, `encode` makes one model call per batch, `write`
hands rows to the writer (indexer/writer.py), which checkpoints every batch; each stage is timed (BuildReport
`stage_seconds`). Unreadable images are skipped with a one-line reason and listed in the manifest.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from search.encoders import Encoder
from search.errors import DatasetError
from search.images import DEFAULT_MAX_MEGAPIXELS
from search.index_choice import IndexOptions
from search.manifest import Manifest

from .loader import Decoded, ImageLoader, Loaded, Reuse, Reused, Skipped, StageClock
from .readers import Sample
from .near_duplicates import calibrate_build
from .writer import IndexWriter

if TYPE_CHECKING:  # ondisk_build imports the writer, which this module imports: no import at run time
    from .ondisk_build import OnDiskOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    batch_size: int = 64
    workers: int = max(1, os.cpu_count() or 1)
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    index: IndexOptions = IndexOptions()
    overwrite: bool = False
    resume: bool = False  # continue an interrupted build of the same job from its last completed batch
    fast_decode: bool = False  # JPEGs decoded at reduced scale (DCT domain): faster, vectors slightly off open_clip's
    progress: bool = True
    on_disk: OnDiskOptions | None = None  # on-disk IVF indexes built a chunk at a time (--on-disk)


@dataclass(frozen=True)
class BuildReport:
    out: Path
    n_images: int
    n_captions: int
    skipped: tuple
    seconds: float
    stage_seconds: dict = field(default_factory=dict)  # per stage of STAGES; read and decode summed over threads
    changes: dict | None = None  # for an update: how many images were new, changed, unchanged, moved, removed

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.stage_seconds.items())
        text = (f"indexed {self.n_images} images and {self.n_captions} captions into {self.out}; skipped "
                f"{len(self.skipped)}; {self.seconds:.1f} s ({self.images_per_second:.1f} images/s; {stages})")
        if self.changes is not None:
            text += "; " + ", ".join(f"{count} {kind}" for kind, count in self.changes.items())
        return text


class Changes:
    """For an update: how many images were new, changed, moved or unchanged, and in the end how many were removed."""

    def __init__(self, reuse: Reuse | None):
        self.reuse = reuse
        self.counts = dict.fromkeys(("new", "changed", "moved", "unchanged"), 0)
        self.moved_from: set[str] = set()

    def count(self, items: Sequence[Reused | Decoded]) -> None:
        for item in items:
            self.counts[item.change] += 1
            if isinstance(item, Reused) and item.moved_from:
                self.moved_from.add(item.moved_from)

    def result(self, samples: Sequence[Sample], skipped: Sequence[dict]) -> dict | None:
        """The counts with "removed" (paths of the previous index neither kept nor moved); None for a build."""
        if self.reuse is None:
            return None
        kept = {s.image for s in samples} - {s["path"] for s in skipped}
        return {**self.counts, "removed": len(set(self.reuse.records) - kept - self.moved_from)}


def batched(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


def encode(encoder: Encoder, items: Sequence[Reused | Decoded], reuse: Reuse | None) -> tuple[list, np.ndarray]:
    """(one vector per item: reused or from one model call over the decoded ones, the vectors of all their captions
    in order: known texts from `reuse`, the rest encoded)."""
    if not items:
        return [], np.zeros((0, encoder.dim), np.float32)
    decoded = [item.pixels for item in items if isinstance(item, Decoded)]
    encoded = iter(encoder.encode_pixels(np.stack(decoded)) if decoded else [])
    image_vectors = [item.vector if isinstance(item, Reused) else next(encoded) for item in items]
    texts = [caption for item in items for caption in item.sample.captions]
    return image_vectors, (reuse.caption_vectors(texts, encoder.encode_texts) if reuse else encoder.encode_texts(texts))


def write(writer: IndexWriter, items: Sequence[Reused | Decoded], image_vectors: list,
          caption_vectors: np.ndarray) -> None:
    """One catalog row and vector per item, its captions' rows and vectors after it."""
    offset = 0
    for item, image_vector in zip(items, image_vectors):
        n = len(item.sample.captions)
        writer.add(item.sample.image, item.size, item.sample.captions, image_vector,
                   caption_vectors[offset:offset + n], item.file, item.sample.split)
        offset += n


def _skip_records(batch: Sequence[Loaded]) -> list[dict]:
    records = [{"path": item.sample.image, "reason": item.reason} for item in batch if isinstance(item, Skipped)]
    for record in records:
        log.warning("skipped %s", record["reason"])
    return records


def build_job(encoder: Encoder, config: BuildConfig, n_samples: int, source: dict | None, update: bool) -> dict:
    """What a resume must match: an interrupted build continues only with the same job."""
    return {"source": source or {}, "encoder": encoder.spec.to_dict(), "fingerprint": encoder.fingerprint,
            "precision": encoder.precision, "samples": n_samples, "update": update,
            "max_megapixels": config.max_megapixels, "fast_decode": config.fast_decode}


def build_manifest(encoder: Encoder, writer: IndexWriter, config: BuildConfig, source: dict | None,
              skipped: Sequence[dict]) -> Manifest:
    return Manifest(
        encoder=encoder.spec, fingerprint=encoder.fingerprint, dim=encoder.dim, n_images=writer.n_images,
        n_captions=writer.n_captions, source=dict(source or {}), skipped=tuple(skipped),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), precision=encoder.precision,
        runtime=encoder.runtime, fast_decode=config.fast_decode)


def build_index(samples: Sequence[Sample], images_root: Path, encoder: Encoder, out: Path,
                config: BuildConfig = BuildConfig(), source: dict | None = None,
                reuse: Reuse | None = None) -> BuildReport:
    """Encode every readable sample (or take its vector from `reuse`) and write a complete index to `out`
    atomically. Ids follow the order of `samples`, so an update equals a fresh build of the same files."""
    started, clock, changes = time.perf_counter(), StageClock(), Changes(reuse)
    loader = ImageLoader(images_root, encoder.preprocess_image, config.max_megapixels,
                         encoder.image_size if config.fast_decode else None, reuse, clock)
    job = build_job(encoder, config, len(samples), source, reuse is not None)
    # route log lines around the progress bar only when there is one (the redirect replaces the root's handlers)
    redirect = logging_redirect_tqdm() if config.progress else contextlib.nullcontext()
    with redirect, IndexWriter(out, config.overwrite, encoder.dim, job, config.resume) as writer, \
            ThreadPoolExecutor(config.workers, thread_name_prefix="decode") as pool, \
            tqdm(total=len(samples), initial=writer.samples_done, unit="img", desc="encoding",
                 disable=not config.progress) as bar:
        skipped, done = list(writer.skipped), writer.samples_done
        for batch in batched(loader.stream(samples[done:], pool, ahead=2 * config.batch_size), config.batch_size):
            kept = [item for item in batch if not isinstance(item, Skipped)]
            skipped += _skip_records(batch)
            with clock("encode"):
                image_vectors, caption_vectors = encode(encoder, kept, reuse)
            with clock("write"):
                write(writer, kept, image_vectors, caption_vectors)
                done += len(batch)
                writer.checkpoint(done, skipped)
            changes.count(kept)
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped), refresh=False)
        if writer.n_images == 0:
            reason = skipped[0]["reason"] if skipped else "no samples"
            raise DatasetError(f"none of the {len(samples)} images could be read (first: {reason})")
        with clock("encode"):  # the near-duplicate tiers, on copies of ~32 of the images: from the raw vectors
            near = calibrate_build(writer, Path(images_root), encoder, config.max_megapixels)
        with clock("index"):
            manifest = writer.commit(replace(build_manifest(encoder, writer, config, source, skipped),
                                             near_duplicates=near), config.index, config.on_disk)
    return BuildReport(Path(out), manifest.n_images, manifest.n_captions, tuple(skipped),
                       time.perf_counter() - started, dict(clock.seconds), changes.result(samples, skipped))
