"""IndexWriter: collects vectors and catalog rows in a work directory beside the target (`.NAME.partial`) and
renames it into place on commit, so readers see either the old index or the complete new one.

Write-ahead for resume: after every batch the vectors are appended to raw files and fsync'd, the catalog commits, and
`progress.json` is replaced atomically. The progress file is the truth: on resume, rows past it (a batch that was
being written when the process died) are cut off. A failure (bad data) deletes the work directory; an interruption
(Ctrl-C, kill -9, power loss) leaves it for `--resume`.

One writer at a time: the writer holds `WriterLock(out)` (indexer/lock.py) from before it looks at the target until
the block is left, so a second writer is refused instead of discarding a work directory a live process is filling.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from search.catalog import CATALOG_NAME, CatalogWriter, FileInfo
from search.errors import EngineError, IndexExistsError
from search.manifest import MANIFEST_NAME, Manifest
from search.store import CAPTION_INDEX, CAPTION_VECTORS, IMAGE_INDEX, IMAGE_VECTORS
from search.index_choice import IndexOptions, build_tuned

from .lock import WriterLock

log = logging.getLogger(__name__)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing target unless --overwrite, and never replace something that is not an index."""
    if not out.exists():
        return
    if not out.is_dir():
        raise IndexExistsError(f"{out} exists and is not a directory")
    is_index = (out / MANIFEST_NAME).is_file()
    if not is_index and any(out.iterdir()):  # --overwrite would not help: say so instead of suggesting it
        raise IndexExistsError(f"{out} is a non-empty directory that is not an index; choose another --out (only an "
                               f"index is ever replaced)")
    if is_index and not overwrite:
        raise IndexExistsError(f"{out} already exists; pass --overwrite to replace it")


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory `tmp` to `out`, replacing what was there: `out` is never missing for more than
    the instant between two renames, and never half written."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


PROGRESS = "progress.json"
RAW_VECTORS = {"images": "image_vectors.f32", "captions": "caption_vectors.f32"}


def partial_dir(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.partial"


class IndexWriter:
    """Usage: `with IndexWriter(out, overwrite, dim, job) as w: w.add(...); w.checkpoint(n); w.commit(manifest)`.

    `job` describes the build (source, model…); resuming requires the same job. Leaving the block by an exception
    other than KeyboardInterrupt deletes the work directory; any existing index stays untouched either way."""

    def __init__(self, out: Path, overwrite: bool = False, dim: int = 0, job: dict | None = None,
                 resume: bool = False):
        self.out = Path(out)
        # before anything looks at or touches the target or its work directory; held until the block is left
        self._lock = WriterLock(self.out).acquire()
        try:
            self._open(overwrite, dim, job, resume)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, overwrite: bool, dim: int, job: dict | None, resume: bool) -> None:
        check_output_dir(self.out, overwrite)
        self.dim = dim
        self.job = json.loads(json.dumps(job or {}))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial_dir(self.out)
        self.samples_done, self.skipped = 0, []
        if resume:
            self._reopen()
        else:
            if self.tmp.exists():
                log.warning("discarding the interrupted build in %s (use --resume to continue it)", self.tmp)
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
            self.catalog = CatalogWriter(self.tmp / CATALOG_NAME)
        self._raw = {kind: (self.tmp / name).open("ab") for kind, name in RAW_VECTORS.items()}
        self.committed = False

    def _reopen(self) -> None:
        try:
            progress = json.loads((self.tmp / PROGRESS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise EngineError(f"nothing to resume for {self.out} (no interrupted build in {self.tmp})") from None
        if progress["job"] != self.job:
            raise EngineError(f"the interrupted build in {self.tmp} used other arguments; run it again without "
                              f"--resume to start over")
        n_images, n_captions = progress["n_images"], progress["n_captions"]
        with sqlite3.connect(self.tmp / CATALOG_NAME) as db:  # rows of a batch that never reached the progress file
            db.execute("DELETE FROM images WHERE id >= ?", (n_images,))
            db.execute("DELETE FROM captions WHERE id >= ?", (n_captions,))
        for kind, rows in (("images", n_images), ("captions", n_captions)):
            with (self.tmp / RAW_VECTORS[kind]).open("ab") as raw:
                raw.truncate(rows * self.dim * 4)
        self.catalog = CatalogWriter(self.tmp / CATALOG_NAME, n_images, n_captions)
        self.samples_done, self.skipped = progress["samples_done"], progress["skipped"]
        log.info("resuming after %d samples (%d images indexed)", self.samples_done, n_images)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.committed:
                return
            for raw in self._raw.values():
                raw.close()
            self.catalog.conn.close()
            if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
                shutil.rmtree(self.tmp, ignore_errors=True)  # a failure, not an interruption: nothing to resume
        finally:
            self._lock.release()

    @property
    def n_images(self) -> int:
        return self.catalog.n_images

    @property
    def n_captions(self) -> int:
        return self.catalog.n_captions

    def add(self, path: str, size: tuple[int, int], captions: Sequence[str], image_vector: np.ndarray,
            caption_vectors: np.ndarray, file: FileInfo | None = None) -> None:
        """One image with its captions; vectors are rows of the encoder's output."""
        assert len(captions) == len(caption_vectors)
        self.catalog.add(path, size[0], size[1], captions, file)
        self._raw["images"].write(np.asarray(image_vector, np.float32).tobytes())
        if len(captions):
            self._raw["captions"].write(np.ascontiguousarray(caption_vectors, np.float32).tobytes())

    def checkpoint(self, samples_done: int, skipped: list[dict]) -> None:
        """Make everything added so far durable, then record it (the record is what a resume trusts)."""
        for raw in self._raw.values():
            raw.flush()
            os.fsync(raw.fileno())
        self.catalog.conn.commit()
        progress = {"samples_done": samples_done, "n_images": self.n_images, "n_captions": self.n_captions,
                    "skipped": skipped, "job": self.job}
        tmp = self.tmp / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(progress), encoding="utf-8")
        os.replace(tmp, self.tmp / PROGRESS)

    def _vectors(self, kind: str) -> np.ndarray:
        return np.fromfile(self.tmp / RAW_VECTORS[kind], np.float32).reshape(-1, self.dim)

    def commit(self, manifest: Manifest, options: IndexOptions = IndexOptions()) -> Manifest:
        """Write vectors, choose/train/tune and write the FAISS indexes, write the manifest (last, with the chosen
        factories and parameters), then swap the directory into place."""
        for raw in self._raw.values():
            raw.close()
        self.catalog.close()
        images, captions = self._vectors("images"), self._vectors("captions")
        total = max(1, len(images) + len(captions))
        reports = {}
        for kind, vectors, queries, index_name, vectors_name in (
                ("images", images, captions, IMAGE_INDEX, IMAGE_VECTORS),
                ("captions", captions, images, CAPTION_INDEX, CAPTION_VECTORS)):
            np.save(self.tmp / vectors_name, vectors)
            budget = options.memory_budget and options.memory_budget * len(vectors) // total  # shared by count
            index, report = build_tuned(vectors, options.factory, budget, options.target_recall, queries,
                                        manifest.metric)
            index.save(self.tmp / index_name)
            reports[kind] = asdict(report)
            if report.params:
                log.info("%s index %s tuned to %s: recall@10 %.3f against exact search", kind, report.factory,
                         report.params, report.recall_at_10)
        manifest = replace(manifest, image_factory=reports["images"]["factory"],
                           caption_factory=reports["captions"]["factory"], indexes=reports)
        for name in (*RAW_VECTORS.values(), PROGRESS):
            (self.tmp / name).unlink(missing_ok=True)
        manifest.write(self.tmp)
        swap_into_place(self.tmp, self.out)
        self.committed = True
        return manifest
