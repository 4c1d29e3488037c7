"""IndexWriter: collects vectors and catalog rows in a work directory beside the target (`.NAME.partial`) and
renames it into place on commit, so readers see either the old index or the complete new one.

Write-ahead for resume: after every batch the vectors are appended to raw files and fsync'd, the catalog commits, and
`progress.json` is replaced atomically. The progress file is the truth: on resume, rows past it (a batch that was
being written when the process died) are cut off. A failure (bad data) deletes the work directory; an interruption
(Ctrl-C, kill -9, power loss) leaves it for `--resume`, and `resume_progress` says whether there is one.
File names: search/layout.py.

One writer at a time: the writer holds `WriterLock(out)` (indexer/lock.py) from before it looks at the target until
the block is left, so a second writer is refused instead of discarding a work directory a live process is filling.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from search.atomic import TEMP_SUFFIX, swap_into_place, write_atomic
from search.catalog import Catalog, CatalogWriter, FileInfo
from search.errors import EngineError, IndexExistsError
from search.layout import (CATALOG_NAME, FAISS_FILES, KINDS, MANIFEST_NAME, PROGRESS_NAME, RAW_VECTOR_FILES,
                           VECTOR_FILES, partial_dir)
from search.manifest import Manifest
from search.index_choice import IndexOptions
from search.relevance import fit_calibration

from .ann_recall import index_for, previous_index, with_on_disk_records
from .lock import WriterLock

if TYPE_CHECKING:  # ondisk_build imports this module
    from .ondisk_build import OnDiskOptions

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


def resume_progress(out: Path) -> dict:
    """The progress record of the interrupted build or update of `out` that a resume continues from; EngineError when
    there is none. The CLI asks before it loads a model, the writer again when it reopens the work directory (which
    also requires the same job)."""
    work = partial_dir(out)
    try:
        progress = json.loads((work / PROGRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        progress = None
    if not isinstance(progress, dict):
        raise EngineError(f"nothing to resume for {out}: no interrupted build in {work}")
    return progress


def with_relevance(manifest: Manifest, directory: Path, seed: int = 0) -> Manifest:
    """`manifest` with score → relevance maps (search/relevance.py) fitted on the vectors files in `directory`,
    memory-mapped (a bounded sample of rows is read), and its catalog's caption → image links; refitted by every
    build, update and migration."""
    vectors = {kind: np.load(directory / VECTOR_FILES[kind], mmap_mode="r") for kind in KINDS}
    catalog = Catalog(directory / CATALOG_NAME)
    try:
        links = catalog.caption_image_ids()
    finally:
        catalog.close()
    calibration = fit_calibration(vectors["images"], vectors["captions"], links, manifest.metric, seed)
    log.info("%s", calibration.summary())
    return replace(manifest, relevance=calibration.to_json())


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
        self._raw = {kind: (self.tmp / name).open("ab") for kind, name in RAW_VECTOR_FILES.items()}
        self.committed = False

    def _reopen(self) -> None:
        progress = resume_progress(self.out)
        if progress["job"] != self.job:
            raise EngineError(f"the interrupted build in {self.tmp} used other arguments; run it again without "
                              f"--resume to start over")
        n_images, n_captions = progress["n_images"], progress["n_captions"]
        for kind, rows in (("images", n_images), ("captions", n_captions)):  # cut a batch the record never reached
            with (self.tmp / RAW_VECTOR_FILES[kind]).open("ab") as raw:
                raw.truncate(rows * self.dim * 4)
        self.catalog = CatalogWriter(self.tmp / CATALOG_NAME, n_images, n_captions)  # cuts its rows past the counts
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
            self.catalog.close(commit=False)
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
            caption_vectors: np.ndarray, file: FileInfo | None = None, split: str | None = None) -> None:
        """One image with its captions; vectors are rows of the encoder's output. `file` carries its identity and
        date, `split` its dataset split (the catalog's keyword index is built when `commit` closes it)."""
        assert len(captions) == len(caption_vectors)
        self.catalog.add(path, size[0], size[1], captions, file, split)
        self._raw["images"].write(np.asarray(image_vector, np.float32).tobytes())
        if len(captions):
            self._raw["captions"].write(np.ascontiguousarray(caption_vectors, np.float32).tobytes())

    def checkpoint(self, samples_done: int, skipped: list[dict]) -> None:
        """Make everything added so far durable, then record it (the record is what a resume trusts)."""
        for raw in self._raw.values():
            raw.flush()
            os.fsync(raw.fileno())
        self.catalog.commit()
        progress = {"samples_done": samples_done, "n_images": self.n_images, "n_captions": self.n_captions,
                    "skipped": skipped, "job": self.job}
        write_atomic(self.tmp / PROGRESS_NAME, json.dumps(progress))

    def _vectors(self, kind: str) -> np.ndarray:
        return np.fromfile(self.tmp / RAW_VECTOR_FILES[kind], np.float32).reshape(-1, self.dim)

    def commit(self, manifest: Manifest, options: IndexOptions = IndexOptions(),
               on_disk: OnDiskOptions | None = None) -> Manifest:
        """Write vectors, choose/train/tune and write the FAISS indexes, write the manifest (last, with the chosen
        factories and parameters), then swap the directory into place. `on_disk` (indexer.ondisk_build.OnDiskOptions):
        on-disk IVF indexes built from the vectors a chunk at a time instead (never all in memory)."""
        for raw in self._raw.values():
            raw.close()
        self.catalog.close()
        if on_disk is not None:
            from .ondisk_build import commit_on_disk  # it imports this module

            reports = commit_on_disk(self.tmp, {kind: self.tmp / name for kind, name in RAW_VECTOR_FILES.items()},
                                     self.dim, on_disk)
            reports = with_on_disk_records(reports, {"images": self.n_images, "captions": self.n_captions},
                                           "update" if self.job.get("update") else "build", on_disk.target_recall)
            return self._finish(with_relevance(manifest, self.tmp), reports)
        vectors = {kind: self._vectors(kind) for kind in KINDS}
        total = max(1, sum(len(v) for v in vectors.values()))
        reports, previous = {}, previous_index(self.out, self.job)  # an update may keep its trained quantisers
        for kind, other in zip(KINDS, reversed(KINDS)):  # each index is tuned on queries of the other kind
            np.save(self.tmp / VECTOR_FILES[kind], vectors[kind])
            budget = options.memory_budget and options.memory_budget * len(vectors[kind]) // total  # shared by count
            index, report = index_for(kind, vectors[kind], vectors[other], replace(options, memory_budget=budget),
                                      manifest.metric, previous)
            index.save(self.tmp / FAISS_FILES[kind])
            reports[kind] = report
            if report["params"]:
                log.info("%s index %s at %s: recall@10 %.3f against exact search", kind, report["factory"],
                         report["params"], report["recall_at_10"])
        return self._finish(with_relevance(manifest, self.tmp), reports)

    def _finish(self, manifest: Manifest, reports: dict) -> Manifest:
        """The manifest with the indexes' reports, written last in the work directory, swapped into place."""
        factories = {kind: report.pop("factory") for kind, report in reports.items()}  # stored once, on its own
        manifest = replace(manifest, image_factory=factories["images"], caption_factory=factories["captions"],
                           indexes=reports)
        for name in (*RAW_VECTOR_FILES.values(), PROGRESS_NAME):
            (self.tmp / name).unlink(missing_ok=True)
        for stray in self.tmp.glob(f".*{TEMP_SUFFIX}"):  # a progress record a kill interrupted mid-write
            stray.unlink(missing_ok=True)
        manifest.write(self.tmp)
        swap_into_place(self.tmp, self.out)
        self.committed = True
        return manifest
