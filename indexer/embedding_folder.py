"""Embedding folders in the LAION / clip-retrieval layout, the format embedding-reader and autofaiss read:

    img_emb/img_emb_0000.npy        float32 [rows, dim], L2-normalised image vectors
    text_emb/text_emb_0000.npy      float32 [rows, dim], the caption vectors, row for row (captioned indexes only)
    metadata/metadata_0000.parquet  image_path, caption, image_id, caption_id: what each row stands for
    embeddings.json                 the model (spec), weights fingerprint, dim, precision, runtime, row count

Rows are (image, caption) pairs, as in LAION: an image with five captions is five rows (its vector repeated); an image
without a caption in a captioned index is one row with a null caption and a zero text vector. An index without
captions gives img_emb and metadata only. Files are numbered with zero padding, because readers pair the numpy and
parquet files by sorted name.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from search.atomic import replace_dir
from search.errors import IndexExistsError
from search.store import open_index

IMAGE_DIR, TEXT_DIR, METADATA_DIR = "img_emb", "text_emb", "metadata"
DESCRIPTION_FILE = "embeddings.json"
FORMAT = 1
ROWS_PER_FILE = 1_000_000  # clip-retrieval writes partitions of about this size
NUMBER_WIDTH = 4  # img_emb_0000.npy: sorted names stay in row order up to 10,000 files


@dataclass(frozen=True)
class EmbeddingFolder:
    """What `export_embeddings` wrote."""

    path: str
    rows: int
    files: int
    with_text: bool
    dim: int

    def to_json(self) -> dict:
        return asdict(self)


def _rows(index) -> tuple[np.ndarray, np.ndarray, list]:
    """(image id per row, caption id per row or -1, caption text per row or None), captions in id order and then
    the images no caption names."""
    links = index.catalog.caption_links()
    if not links:
        ids = np.asarray(index.catalog.image_ids(), np.int64)
        return ids, np.full(len(ids), -1, np.int64), [None] * len(ids)
    texts = index.catalog.captions([c for c, _ in links])
    captioned = {image for _, image in links}
    lonely = [i for i in index.catalog.image_ids() if i not in captioned]
    image_ids = np.asarray([image for _, image in links] + lonely, np.int64)
    caption_ids = np.asarray([c for c, _ in links] + [-1] * len(lonely), np.int64)
    return image_ids, caption_ids, [texts[c].text for c, _ in links] + [None] * len(lonely)


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    is_folder = (out / DESCRIPTION_FILE).is_file()
    if out.is_dir() and not is_folder and any(out.iterdir()):
        raise IndexExistsError(f"{out} is a non-empty directory that is not an embedding folder; choose another --out")
    if not out.is_dir() or not overwrite:
        raise IndexExistsError(f"{out} already exists; pass --overwrite to replace it")


def export_embeddings(index_dir: Path | str, out: Path | str, rows_per_file: int = ROWS_PER_FILE,
                      overwrite: bool = False) -> EmbeddingFolder:
    """Write the vectors of the index at `index_dir` as an embedding folder at `out` (atomically: a reader sees no
    folder, the old one or the complete new one). Raises IndexFormatError for a bad index, IndexExistsError for a
    target that exists (without `overwrite`) or is not an embedding folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    _check_target(out, overwrite)
    index = open_index(index_dir)
    image_ids, caption_ids, captions = _rows(index)
    with_text = bool((caption_ids >= 0).any())
    paths = {record.id: record.path for record in index.catalog.all_images()}
    m = index.manifest
    files = max(1, -(-len(image_ids) // rows_per_file))

    def write(tmp: Path) -> None:
        for name in (IMAGE_DIR, METADATA_DIR) + ((TEXT_DIR,) if with_text else ()):
            (tmp / name).mkdir(parents=True)
        for part in range(files):
            rows = slice(part * rows_per_file, (part + 1) * rows_per_file)
            number = f"{part:0{NUMBER_WIDTH}d}"
            np.save(tmp / IMAGE_DIR / f"img_emb_{number}.npy", np.asarray(index.image_vectors[image_ids[rows]]))
            if with_text:
                text = np.zeros((len(image_ids[rows]), m.dim), np.float32)
                named = caption_ids[rows] >= 0
                text[named] = index.caption_vectors[caption_ids[rows][named]]
                np.save(tmp / TEXT_DIR / f"text_emb_{number}.npy", text)
            table = pa.table({"image_path": [paths[int(i)] for i in image_ids[rows]], "caption": captions[rows],
                              "image_id": image_ids[rows], "caption_id": caption_ids[rows]})
            pq.write_table(table, tmp / METADATA_DIR / f"metadata_{number}.parquet")
        description = {"format": FORMAT, "encoder": m.encoder.to_dict(), "fingerprint": m.fingerprint, "dim": m.dim,
                       "precision": m.precision, "runtime": m.runtime, "rows": int(len(image_ids)),
                       "source": m.source, "index": str(Path(index_dir).resolve())}
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(description, indent=1, ensure_ascii=False), encoding="utf-8")

    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(out, write)
    return EmbeddingFolder(str(out), int(len(image_ids)), files, with_text, m.dim)
