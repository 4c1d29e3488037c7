"""Reading an index directory: manifest, catalog, FAISS indexes and raw vectors, checked against each other.

The files and their names: search/layout.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .catalog import Catalog
from .encoders import Encoder
from .errors import IndexFormatError, ModelMismatchError
from .layout import CATALOG_NAME, FAISS_FILES, INDEX_FILES, KINDS, MANIFEST_NAME, VECTOR_FILES
from .manifest import Manifest, read_manifest
from .ondisk_index import OnDiskIndex
from .vector_index import VectorIndex


@dataclass
class StoredIndex:
    path: Path
    manifest: Manifest
    catalog: Catalog
    images: VectorIndex  # an OnDiskIndex (a VectorIndex) for on-disk indexes
    captions: VectorIndex
    # raw vectors, memory-mapped when opened: bound to this version's files. float32, except in on-disk indexes
    # built from a float16 embedding folder (manifest indexes[kind]["on_disk"]), which keep float16: callers that
    # compute with them convert rows to float32 (np.asarray(rows, np.float32))
    image_vectors: np.ndarray
    caption_vectors: np.ndarray
    version: tuple = ()  # identity of the manifest file: changes whenever a build or update swaps a new index in

    def vectors(self, kind: str) -> np.ndarray:
        """The raw vectors ('images' or 'captions') of this version: float32, or float16 (on-disk indexes)."""
        return self.image_vectors if kind == "images" else self.caption_vectors

    def check_encoder(self, encoder: Encoder) -> None:
        """Raise ModelMismatchError unless `encoder` is the model this index was built with."""
        built = self.manifest
        if encoder.spec != built.encoder:
            raise ModelMismatchError(
                f"index {self.path} was built with {built.encoder}, not {encoder.spec}; query it with the same model "
                f"or rebuild it")
        if encoder.dim != built.dim:
            raise ModelMismatchError(f"index {self.path} holds {built.dim}-d vectors but the model gives {encoder.dim}-d")
        if encoder.fingerprint != built.fingerprint:
            raise ModelMismatchError(
                f"the weights of {encoder.spec} changed since index {self.path} was built (fingerprint "
                f"{encoder.fingerprint} != {built.fingerprint}); rebuild the index")


def open_index(path: Path | str) -> StoredIndex:
    """Open an index directory read-only; IndexFormatError when files are missing or disagree."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in INDEX_FILES:
        if not (path / name).is_file():
            raise IndexFormatError(f"index {path} is incomplete: {name} is missing")
    try:
        vectors = [_open_vectors(path / VECTOR_FILES[kind]) for kind in KINDS]
    except ValueError as exc:
        raise IndexFormatError(f"index {path}: unreadable vectors file ({exc})") from None
    try:
        images, captions = (_open_faiss(path, kind, manifest, raw) for kind, raw in zip(KINDS, vectors))
    except (RuntimeError, ValueError) as exc:
        raise IndexFormatError(f"index {path}: cannot read FAISS index ({str(exc).splitlines()[0]})") from None
    for kind, index, expected in (("image", images, manifest.n_images), ("caption", captions, manifest.n_captions)):
        if index.ntotal != expected or (index.ntotal and index.dim != manifest.dim):
            raise IndexFormatError(
                f"index {path}: {kind} index holds {index.ntotal} vectors of dim {index.dim}, manifest says "
                f"{expected} of dim {manifest.dim}")
    stat = (path / MANIFEST_NAME).stat()
    return StoredIndex(path, manifest, Catalog(path / CATALOG_NAME), images, captions, *vectors,
                       (stat.st_ino, stat.st_mtime_ns))


def _open_faiss(path: Path, kind: str, manifest: Manifest, vectors: np.ndarray) -> VectorIndex:
    entry = manifest.indexes.get(kind, {})
    if entry.get("on_disk"):  # IVF lists in NAME.ivfdata, candidates re-scored from the raw vectors
        return OnDiskIndex.load(path / FAISS_FILES[kind], vectors, manifest.factory(kind), manifest.metric,
                                entry.get("params"))
    return VectorIndex.load(path / FAISS_FILES[kind], manifest.factory(kind), manifest.metric, entry.get("params"),
                            vectors=vectors)


def _open_vectors(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be memory-mapped
        return np.load(path)
