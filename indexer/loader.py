"""The build's reader: each sample becomes `Reused` (its vector is taken from a previous index), `Decoded` (pixels to
encode) or `Skipped` (a one-line reason), in sample order, decoded by worker threads a bounded window ahead of the
model (PIL and torchvision release the GIL for most of that work).

Stage times (read, decode, …) are summed in a `StageClock`; the threads of a stage run in parallel, so a stage's sum
may exceed the wall-clock time of the build.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image

from search.catalog import FileInfo, ImageRecord
from search.errors import ImageReadError
from search.images import ALLOWED_FORMATS, load_image
from search.store import StoredIndex

from .readers import Sample

STAGES = ("read", "decode", "encode", "write", "index")  # index: FAISS training, tuning and the swap into place
EXIF_IFD, DATE_TIME_ORIGINAL, OFFSET_TIME_ORIGINAL = 0x8769, 0x9003, 0x9011  # EXIF tags (the Exif sub-IFD's)
EXIF_DATE_FORMAT = "%Y:%m:%d %H:%M:%S"


def exif_taken(image: Image.Image) -> int | None:
    """POSIX seconds of the image's EXIF DateTimeOriginal, at its OffsetTimeOriginal when there is one, else read as
    UTC (the camera's zone is unknown; the same rule as naive dates in query filters); None when absent or invalid."""
    try:
        tags = image.getexif().get_ifd(EXIF_IFD)
        moment = datetime.strptime(str(tags[DATE_TIME_ORIGINAL]).strip("\x00 "), EXIF_DATE_FORMAT)
    except (KeyError, ValueError, TypeError, OSError, SyntaxError):
        return None
    zone = timezone.utc
    offset = str(tags.get(OFFSET_TIME_ORIGINAL, "")).strip("\x00 ")
    if len(offset) == 6 and offset[0] in "+-" and offset[3] == ":" and offset[1:3].isdigit() and offset[4:].isdigit():
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:]))
        zone = timezone(-delta if offset[0] == "-" else delta)
    return int(moment.replace(tzinfo=zone).timestamp())


def taken_from(image: Image.Image | None, mtime_ns: int) -> int:
    """When a photo was taken: its EXIF date, else the file's modification time (whole POSIX seconds)."""
    taken = exif_taken(image) if image is not None else None
    return taken if taken is not None else mtime_ns // 1_000_000_000


def file_taken(path: Path, mtime_ns: int) -> int:
    """`taken_from` a file, reading its header only (an unreadable one: the mtime)."""
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            return taken_from(image, mtime_ns)
    except (OSError, SyntaxError, ValueError):
        return taken_from(None, mtime_ns)


class StageClock:
    """Seconds spent per stage, from any thread: `with clock("decode"): ...`."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds[stage] += elapsed


@dataclass(frozen=True)
class Reused:
    """An image whose vector a previous index already holds: unchanged (same path, size and mtime, or touched) or
    moved (same content under another path)."""
    sample: Sample
    size: tuple[int, int]
    vector: np.ndarray
    file: FileInfo
    change: str = "unchanged"  # or "moved"
    moved_from: str | None = None


@dataclass(frozen=True)
class Decoded:
    """An image decoded and preprocessed for the model: new, or changed since the previous index."""
    sample: Sample
    size: tuple[int, int]  # of the source file, before any reduced-scale decoding
    pixels: np.ndarray
    file: FileInfo
    change: str = "new"  # or "changed"


@dataclass(frozen=True)
class Skipped:
    """A sample that yields no image: missing, unreadable or undecodable, with the one-line reason."""
    sample: Sample
    reason: str


Loaded = Union[Reused, Decoded, Skipped]


class Reuse:
    """Vectors of a previous index that an update may keep: an image whose path, size and mtime are unchanged, or
    whose content hash is known (moved, renamed, touched); a caption whose text is known."""

    def __init__(self, previous: StoredIndex, images_root: Path | None = None):
        """`images_root`: where the files are now, to date the kept images a version-2 index has no date for."""
        self.root = Path(images_root) if images_root is not None else None
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

    def file_of(self, record: ImageRecord, root: Path | None = None) -> FileInfo:
        """The stored identity of an unchanged file, with its stored date, or (none stored: a version-2 index) the
        date read from the file under `root` (else this Reuse's root) now."""
        taken = record.taken
        root = root if root is not None else self.root
        if taken is None and root is not None:
            taken = file_taken(root / record.path, record.mtime_ns)
        return FileInfo(record.size, record.mtime_ns, record.sha1, taken)

    def by_content(self, sample: Sample, file: FileInfo) -> Reused | None:
        """The stored vector of a file whose content the previous index holds (touched, moved or renamed)."""
        same = self.by_hash.get(file.sha1)
        if same is None:
            return None
        moved = same.path != sample.image
        return Reused(sample, (same.width, same.height), self.image_vectors[same.id], file,
                      "moved" if moved else "unchanged", same.path if moved else None)

    def caption_vectors(self, texts: Sequence[str], encode) -> np.ndarray:
        """Stored vectors for known texts, `encode` for the rest, in order."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.captions]
        fresh = dict(zip(missing, encode(missing))) if missing else {}
        rows = [self.captions.get(t, fresh.get(t)) for t in texts]
        return np.stack(rows).astype(np.float32) if rows else encode([])


class ImageLoader:
    """`loader(sample)` → Reused | Decoded | Skipped, safe to call from several threads; `loader.stream(...)` runs
    it over samples on a pool, in order."""

    def __init__(self, images_root: Path, preprocess: Callable[[Image.Image], np.ndarray], max_megapixels: float,
                 min_side: int | None = None, reuse: Reuse | None = None, clock: StageClock | None = None,
                 shown_root: Path | None = None):
        """`preprocess`: an encoder's `preprocess_image` (or its picklable `image_preprocessor()` in a worker
        process); `min_side`: the model's input side for reduced-scale JPEG decoding (--fast-decode), else None;
        `shown_root`: the root as the user gave it, for messages (a worker reads from the resolved one)."""
        self.root = Path(images_root)
        self.shown_root = Path(shown_root) if shown_root is not None else self.root
        self.preprocess = preprocess
        self.max_megapixels = max_megapixels
        self.min_side = min_side
        self.reuse = reuse
        self.clock = clock or StageClock()

    def __call__(self, sample: Sample) -> Loaded:
        path, reuse, shown = self.root / sample.image, self.reuse, self.shown_root / sample.image
        try:
            with self.clock("read"):
                stat = path.stat()
                known = reuse and reuse.unchanged(sample.image, stat.st_size, stat.st_mtime_ns)
                if known:
                    return Reused(sample, (known.width, known.height), reuse.image_vectors[known.id],
                                  reuse.file_of(known, self.root))
                data = path.read_bytes()
                file = FileInfo.of(stat, data)
            same = reuse and reuse.by_content(sample, file)
            if same:  # the same content elsewhere: its date from the file (the EXIF date, else this file's mtime)
                return replace(same, file=replace(file, taken=file_taken(path, stat.st_mtime_ns)))
            with self.clock("decode"):
                image = load_image(data, self.max_megapixels, self.min_side, name=str(shown))
                pixels = self.preprocess(image)
            file = replace(file, taken=taken_from(image, stat.st_mtime_ns))  # EXIF survives decoding (info["exif"])
            return Decoded(sample, image.info["source_size"], pixels, file,
                           "changed" if reuse and sample.image in reuse.records else "new")
        except FileNotFoundError:
            return Skipped(sample, f"{shown}: file not found")
        except ImageReadError as exc:
            return Skipped(sample, str(exc))
        except OSError as exc:
            return Skipped(sample, f"{shown}: cannot read ({exc.strerror or exc})")

    def stream(self, samples: Iterable[Sample], pool: Executor, ahead: int) -> Iterator[Loaded]:
        """Loaded samples in order, with at most `ahead` in flight on `pool`."""
        return prefetch(pool, self, samples, ahead)


def prefetch(pool: Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """`map(fn, items)` on a pool, in order, with at most `ahead` items in flight (bounded memory)."""
    items = iter(items)
    window = deque(pool.submit(fn, item) for item in islice(items, ahead))
    while window:
        result = window.popleft().result()
        for item in islice(items, 1):
            window.append(pool.submit(fn, item))
        yield result
