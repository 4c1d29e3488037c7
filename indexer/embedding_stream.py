"""Streaming reads of an embedding folder (layout: embedding_folder.py) and of `.npy` files: chunks of a bounded
number of rows, never a whole file in memory.

Rows are read with explicit file reads (`np.fromfile` after a seek) or through a mapping that is dropped as soon as
the chunk is copied out: pages of a long-lived `np.load(mmap_mode="r")` mapping count in the process's resident size
while it is mapped, so streaming 10 GB through one would look like 10 GB of RSS.

Grouping: rows with the same image_path become one image (its vector from its first row, the captions of all its
rows), as in from_embeddings.py, but only CONSECUTIVE rows are grouped (how `indexer export` and clip-retrieval
write them), so memory stays bounded. An image whose rows are scattered would come out twice; the catalog's unique
path constraint refuses that and the builder reports it as a DatasetError naming the path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from search.errors import DatasetError

from .embedding_folder import IMAGE_DIR, METADATA_DIR, TEXT_DIR


@dataclass(frozen=True)
class NpyFile:
    """A 2-d C-order `.npy` file: where its rows start and what they are."""

    path: Path
    rows: int
    dim: int
    dtype: np.dtype
    offset: int  # bytes before row 0

    @classmethod
    def open(cls, path: Path | str) -> "NpyFile":
        path = Path(path)
        try:
            with path.open("rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                offset = f.tell()
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: not a readable .npy file ({exc})") from None
        if len(shape) != 2 or fortran or dtype.kind != "f":
            raise DatasetError(f"{path}: expected a 2-d C-order float array, found shape {shape} {dtype}")
        return cls(path, int(shape[0]), int(shape[1]), dtype, offset)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new in-memory array of the file's dtype."""
        stop = min(stop, self.rows)
        if stop <= start:
            return np.zeros((0, self.dim), self.dtype)
        with self.path.open("rb") as f:
            f.seek(self.offset + start * self.dim * self.dtype.itemsize)
            rows = np.fromfile(f, self.dtype, (stop - start) * self.dim)
        if len(rows) != (stop - start) * self.dim:
            raise DatasetError(f"{self.path} is truncated: fewer than the {self.rows} rows its header says")
        return rows.reshape(-1, self.dim)

    def chunks(self, rows_per_chunk: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) for consecutive chunks of at most `rows_per_chunk` rows of [start, stop)."""
        stop = self.rows if stop is None else min(stop, self.rows)
        for first in range(start, stop, rows_per_chunk):
            yield first, self.read(first, min(stop, first + rows_per_chunk))

    def pick(self, ids: np.ndarray, rows_per_chunk: int) -> np.ndarray:
        """The rows `ids` (ascending), read through one mapping of at most `rows_per_chunk` rows at a time: only the
        pages holding picked rows are read, and the mapping is dropped after each window."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.dim), self.dtype)
        done = 0
        while done < len(ids):
            first = int(ids[done])
            last = min(self.rows, first + rows_per_chunk)
            upto = done + int(np.searchsorted(ids[done:], last))
            window = np.memmap(self.path, self.dtype, "r", self.offset + first * self.dim * self.dtype.itemsize,
                               (last - first, self.dim))
            out[done:upto] = window[ids[done:upto] - first]
            del window
            done = upto
        return out


class NpyWriter:
    """Appends rows to a 2-d `.npy` file whose row count is known only at the end: the header is written for 0 rows
    (numpy leaves room in it for the shape to grow) and rewritten in place by `close()`."""

    def __init__(self, path: Path, dim: int, dtype: np.dtype):
        self.path, self.dim, self.dtype, self.rows = Path(path), dim, np.dtype(dtype), 0
        self._file = self.path.open("wb")
        self._header_size = self._header(0)

    def _header(self, rows: int) -> int:
        self._file.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (rows, self.dim)}
        np.lib.format.write_array_header_1_0(self._file, header)
        return self._file.tell()

    def append(self, rows: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self._file.closed:
            return
        end = self._file.tell()
        if self._header(self.rows) != self._header_size:  # numpy pads for 21 digits: cannot happen
            raise ValueError(f"{self.path}: the .npy header grew")
        self._file.seek(end)
        self._file.close()


@dataclass(frozen=True)
class FolderFiles:
    """The files of an embedding folder, paired by sorted name as embedding-reader pairs them."""

    images: tuple[NpyFile, ...]
    texts: tuple[NpyFile, ...] | None
    metadata: tuple[Path, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.images)

    @property
    def dim(self) -> int:
        return self.images[0].dim

    @property
    def dtype(self) -> np.dtype:
        return self.images[0].dtype

    def float32_bytes(self) -> int:
        """What the folder's vectors would take as float32 (image and caption rows)."""
        return self.rows * self.dim * 4 * (2 if self.texts else 1)


def folder_files(folder: Path | str) -> FolderFiles:
    """Check the layout from the file headers alone (nothing is read); DatasetError when it is not one."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    images = sorted((folder / IMAGE_DIR).glob("*.npy"))
    metadata = sorted((folder / METADATA_DIR).glob("*.parquet"))
    texts = sorted((folder / TEXT_DIR).glob("*.npy"))
    if not images or len(images) != len(metadata) or (texts and len(texts) != len(images)):
        raise DatasetError(f"{folder} is not an embedding folder: expected as many {IMAGE_DIR}/*.npy as "
                           f"{METADATA_DIR}/*.parquet files (and {TEXT_DIR}/*.npy if any); found {len(images)}, "
                           f"{len(metadata)} and {len(texts)}")
    image_files = tuple(NpyFile.open(p) for p in images)
    text_files = tuple(NpyFile.open(p) for p in texts) if texts else None
    for number, meta in enumerate(metadata):
        parquet = pq.ParquetFile(meta)
        if "image_path" not in parquet.schema_arrow.names:
            raise DatasetError(f"{meta} has no image_path column (columns: {', '.join(parquet.schema_arrow.names)})")
        counts = {image_files[number].rows, parquet.metadata.num_rows}
        if text_files:
            counts.add(text_files[number].rows)
        if len(counts) != 1:
            raise DatasetError(f"{images[number].name} and {meta.name} disagree on the number of rows")
    dims = {f.dim for f in image_files + (text_files or ())}
    if len(dims) != 1:
        raise DatasetError(f"{folder} mixes vectors of dimensions {sorted(dims)}")
    return FolderFiles(image_files, text_files, tuple(metadata))


@dataclass
class Rows:
    """Consecutive rows of the folder: image path, caption (None when empty), image and text vectors (raw dtype)."""

    paths: list
    captions: list
    images: np.ndarray
    texts: np.ndarray | None

    def cut(self, start: int, stop: int | None = None) -> "Rows":
        return Rows(self.paths[start:stop], self.captions[start:stop], self.images[start:stop],
                    None if self.texts is None else self.texts[start:stop])

    @staticmethod
    def join(a: "Rows", b: "Rows") -> "Rows":
        return Rows(a.paths + b.paths, a.captions + b.captions, np.concatenate([a.images, b.images]),
                    None if a.texts is None else np.concatenate([a.texts, b.texts]))


def read_rows(files: FolderFiles, rows_per_chunk: int) -> Iterator[Rows]:
    """The folder's rows in order, at most `rows_per_chunk` at a time."""
    import pyarrow.parquet as pq

    for number, meta in enumerate(files.metadata):
        parquet = pq.ParquetFile(meta)
        columns = [c for c in ("image_path", "caption") if c in parquet.schema_arrow.names]
        start = 0
        for batch in parquet.iter_batches(batch_size=rows_per_chunk, columns=columns):
            stop = start + batch.num_rows
            paths = [str(p) for p in batch.column("image_path").to_pylist()]
            captions = ([c if c else None for c in batch.column("caption").to_pylist()] if "caption" in columns
                        else [None] * len(paths))
            texts = files.texts[number].read(start, stop) if files.texts else None
            yield Rows(paths, captions, files.images[number].read(start, stop), texts)
            start = stop


@dataclass
class Images:
    """Whole images of a stretch of rows: path, image vector and captions with their vectors, per image."""

    paths: list
    image_vectors: np.ndarray  # [images, dim]
    captions: list  # per image: its non-empty captions
    caption_vectors: np.ndarray  # [captions, dim], in the order of `captions` flattened
    rows: int  # folder rows these images came from


def _group(rows: Rows) -> Images:
    starts = [i for i, p in enumerate(rows.paths) if i == 0 or p != rows.paths[i - 1]]
    bounds = starts[1:] + [len(rows.paths)]
    captioned = [i for i, c in enumerate(rows.captions) if c is not None and rows.texts is not None]
    captions = [[rows.captions[r] for r in range(a, b) if rows.captions[r] is not None and rows.texts is not None]
                for a, b in zip(starts, bounds)]
    texts = rows.texts[captioned] if rows.texts is not None else np.zeros((0, rows.images.shape[1]), rows.images.dtype)
    return Images([rows.paths[i] for i in starts], rows.images[starts], captions, texts, len(rows.paths))


def read_images(files: FolderFiles, rows_per_chunk: int) -> Iterator[Images]:
    """Images in folder order, grouped from consecutive rows; an image's rows may straddle chunks and files (its
    last rows wait for the next chunk)."""
    pending = None
    for rows in read_rows(files, rows_per_chunk):
        rows = rows if pending is None else Rows.join(pending, rows)
        last = len(rows.paths) - 1
        while last > 0 and rows.paths[last - 1] == rows.paths[-1]:
            last -= 1
        if last > 0:
            yield _group(rows.cut(0, last))
        pending = rows.cut(last)
    if pending is not None and pending.paths:
        yield _group(pending)
