"""IndexWriter: collects vectors and catalog rows in a temporary directory beside the target and renames it into
place on commit, so readers see either the old index or the complete new one, and a failed build leaves nothing.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from search.catalog import CATALOG_NAME, CatalogWriter, FileInfo
from search.errors import IndexExistsError
from search.manifest import MANIFEST_NAME, Manifest
from search.store import CAPTION_INDEX, CAPTION_VECTORS, IMAGE_INDEX, IMAGE_VECTORS
from search.index_choice import IndexOptions, build_tuned

log = logging.getLogger(__name__)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing target unless --overwrite, and never replace something that is not an index."""
    if not out.exists():
        return
    if not out.is_dir():
        raise IndexExistsError(f"{out} exists and is not a directory")
    is_index = (out / MANIFEST_NAME).is_file()
    if not overwrite and (is_index or any(out.iterdir())):
        raise IndexExistsError(f"{out} already exists; pass --overwrite to replace it")
    if overwrite and not is_index and any(out.iterdir()):
        raise IndexExistsError(f"{out} is a non-empty directory that is not an index; refusing to replace it")


class IndexWriter:
    """Usage: `with IndexWriter(out, overwrite) as w: w.add(...); w.commit(manifest)`; leaving the block without
    commit (an exception, Ctrl-C) deletes the temporary directory and keeps any existing index untouched."""

    def __init__(self, out: Path, overwrite: bool = False, dim: int = 0):
        self.out = Path(out)
        check_output_dir(self.out, overwrite)
        self.dim = dim
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.catalog = CatalogWriter(self.tmp / CATALOG_NAME)
        self._image_vectors: list[np.ndarray] = []
        self._caption_vectors: list[np.ndarray] = []
        self.committed = False

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.catalog.conn.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

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
        self._image_vectors.append(np.asarray(image_vector, np.float32)[None])
        if len(captions):
            self._caption_vectors.append(np.asarray(caption_vectors, np.float32))

    def _stacked(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def commit(self, manifest: Manifest, options: IndexOptions = IndexOptions()) -> Manifest:
        """Write vectors, choose/train/tune and write the FAISS indexes, write the manifest (last, with the chosen
        factories and parameters), then swap the directory into place."""
        self.catalog.close()
        images, captions = self._stacked(self._image_vectors), self._stacked(self._caption_vectors)
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
        manifest.write(self.tmp)
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            self.out.rename(old / "index")
        self.tmp.rename(self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
