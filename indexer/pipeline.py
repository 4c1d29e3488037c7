"""The build pipeline: samples → (decode + preprocess in worker threads) → encoder → IndexWriter.

A plain loop joins the three: worker threads decode and preprocess a bounded window of images ahead of the model
(PIL and torchvision release the GIL for most of that work), the main thread encodes full batches and hands rows to
the writer. Unreadable images are skipped with a one-line reason and listed in the manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
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

from search.catalog import FileInfo
from search.encoders import Encoder
from search.errors import DatasetError, ImageReadError
from search.images import DEFAULT_MAX_MEGAPIXELS, load_image
from search.index_choice import IndexOptions
from search.manifest import Manifest
from search.store import StoredIndex

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
    resume: bool = False  # continue an interrupted build of the same job from its last completed batch
    fast_decode: bool = False  # JPEGs decoded at reduced scale (DCT domain): faster, vectors slightly off open_clip's
    progress: bool = True


@dataclass(frozen=True)
class BuildReport:
    out: Path
    n_images: int
    n_captions: int
    skipped: tuple
    seconds: float
    encode_seconds: float
    changes: dict | None = None  # for an update: how many images were new, changed, unchanged, moved, removed

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = (f"indexed {self.n_images} images and {self.n_captions} captions into {self.out}; skipped "
                f"{len(self.skipped)}; {self.seconds:.1f} s ({self.images_per_second:.1f} images/s, model "
                f"{self.encode_seconds:.1f} s)")
        if self.changes is not None:
            text += "; " + ", ".join(f"{count} {kind}" for kind, count in self.changes.items())
        return text


@dataclass(frozen=True)
class LoadedImage:
    sample: Sample
    size: tuple[int, int] | None = None
    pixels: np.ndarray | None = None  # to encode, or
    vector: np.ndarray | None = None  # reused from a previous index
    file: FileInfo | None = None
    change: str = "new"  # against a previous index: new, changed, unchanged, moved (or touched)
    moved_from: str | None = None
    error: str | None = None


class Reuse:
    """Vectors of a previous index that an update may keep: an image whose path, size and mtime are unchanged, or
    whose content hash is known (moved, renamed, touched); a caption whose text is known."""

    def __init__(self, previous: StoredIndex):
        self.records = {r.path: r for r in previous.catalog.all_images()}
        self.by_hash = {r.sha1: r for r in self.records.values() if r.sha1}
        self.image_vectors = previous.vectors("images")
        texts = [c.text for c in previous.catalog.captions(range(previous.manifest.n_captions)).values()]
        caption_vectors = previous.vectors("captions")
        self.captions = {text: caption_vectors[i] for i, text in reversed(list(enumerate(texts)))}

    def unchanged(self, path: str, size: int, mtime_ns: int):
        record = self.records.get(path)
        if record is not None and (record.size, record.mtime_ns) == (size, mtime_ns) and record.sha1:
            return record
        return None

    def same_content(self, sha1: str):
        return self.by_hash.get(sha1)

    def caption_vectors(self, texts: Sequence[str], encode) -> np.ndarray:
        """Stored vectors for known texts, `encode` for the rest, in order."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.captions]
        fresh = dict(zip(missing, encode(missing))) if missing else {}
        rows = [self.captions.get(t, fresh.get(t)) for t in texts]
        return np.stack(rows).astype(np.float32) if rows else encode([])


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
                config: BuildConfig = BuildConfig(), source: dict | None = None,
                reuse: Reuse | None = None) -> BuildReport:
    """Encode every readable sample (or take its vector from `reuse`) and write a complete index to `out`
    atomically. Ids follow the order of `samples`, so an update equals a fresh build of the same files."""
    images_root = Path(images_root)

    def load(sample: Sample) -> LoadedImage:
        path = images_root / sample.image
        try:
            stat = path.stat()
            known = reuse and reuse.unchanged(sample.image, stat.st_size, stat.st_mtime_ns)
            if known:
                return LoadedImage(sample, (known.width, known.height), vector=reuse.image_vectors[known.id],
                                   file=FileInfo(known.size, known.mtime_ns, known.sha1), change="unchanged")
            data = path.read_bytes()
            file = FileInfo(stat.st_size, stat.st_mtime_ns, hashlib.sha1(data).hexdigest())
            same = reuse and reuse.same_content(file.sha1)
            if same:
                moved = same.path != sample.image
                return LoadedImage(sample, (same.width, same.height), vector=reuse.image_vectors[same.id], file=file,
                                   change="moved" if moved else "unchanged", moved_from=same.path if moved else None)
            image = load_image(data, config.max_megapixels, encoder.image_size if config.fast_decode else None,
                               name=str(path))
            change = "changed" if reuse and sample.image in reuse.records else "new"
            return LoadedImage(sample, image.info["source_size"], encoder.preprocess_image(image), file=file,
                               change=change)
        except FileNotFoundError:
            return LoadedImage(sample, error=f"{path}: file not found")
        except ImageReadError as exc:
            return LoadedImage(sample, error=str(exc))
        except OSError as exc:
            return LoadedImage(sample, error=f"{path}: cannot read ({exc.strerror or exc})")

    started = time.perf_counter()
    encode_seconds = 0.0
    job = {"source": source or {}, "encoder": encoder.spec.to_dict(), "fingerprint": encoder.fingerprint,
           "precision": encoder.precision, "samples": len(samples), "update": reuse is not None,
           "max_megapixels": config.max_megapixels, "fast_decode": config.fast_decode}
    changes = dict.fromkeys(("new", "changed", "moved", "unchanged"), 0)
    moved_from: set[str] = set()
    # route log lines around the progress bar only when there is one (the redirect replaces the root's handlers)
    redirect = logging_redirect_tqdm() if config.progress else contextlib.nullcontext()
    with redirect, IndexWriter(out, config.overwrite, encoder.dim, job, config.resume) as writer, \
            ThreadPoolExecutor(config.workers, thread_name_prefix="decode") as pool, \
            tqdm(total=len(samples), initial=writer.samples_done, unit="img", desc="encoding",
                 disable=not config.progress) as bar:
        skipped: list[dict] = list(writer.skipped)
        done = writer.samples_done
        for batch in batched(prefetch(pool, load, samples[done:], ahead=2 * config.batch_size), config.batch_size):
            good = [item for item in batch if item.error is None]
            for item in batch:
                if item.error is not None:
                    log.warning("skipped %s", item.error)
                    skipped.append({"path": item.sample.image, "reason": item.error})
            if good:
                tick = time.perf_counter()
                to_encode = [item for item in good if item.vector is None]
                encoded = iter(encoder.encode_pixels(np.stack([item.pixels for item in to_encode]))
                               if to_encode else [])
                image_vectors = [item.vector if item.vector is not None else next(encoded) for item in good]
                texts = [caption for item in good for caption in item.sample.captions]
                text_vectors = (reuse.caption_vectors(texts, encoder.encode_texts) if reuse
                                else encoder.encode_texts(texts))
                encode_seconds += time.perf_counter() - tick
                offset = 0
                for item, image_vector in zip(good, image_vectors):
                    changes[item.change] += 1
                    moved_from.add(item.moved_from)
                    n = len(item.sample.captions)
                    writer.add(item.sample.image, item.size, item.sample.captions, image_vector,
                               text_vectors[offset:offset + n], item.file)
                    offset += n
            done += len(batch)
            writer.checkpoint(done, skipped)
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped), refresh=False)
        if writer.n_images == 0:
            reason = skipped[0]["reason"] if skipped else "no samples"
            raise DatasetError(f"none of the {len(samples)} images could be read (first: {reason})")
        manifest = Manifest(
            encoder=encoder.spec, fingerprint=encoder.fingerprint, dim=encoder.dim, n_images=writer.n_images,
            n_captions=writer.n_captions, source=dict(source or {}), skipped=tuple(skipped),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), precision=encoder.precision,
            fast_decode=config.fast_decode)
        manifest = writer.commit(manifest, config.index)
    seconds = time.perf_counter() - started
    if reuse is not None:
        kept = {s.image for s in samples} - {s["path"] for s in skipped}
        changes["removed"] = len(set(reuse.records) - kept - moved_from)
    return BuildReport(Path(out), manifest.n_images, manifest.n_captions, tuple(skipped), seconds, encode_seconds,
                       changes if reuse is not None else None)
