"""Building an index from an embedding folder without encoding anything: ours (`indexer export`) or one written by
`clip-retrieval inference` (then the caller names the model that made it, so queries are encoded with the same one).

Rows are (image, caption) pairs (see embedding_folder.py): rows with the same image_path become one image, its vector
taken from its first row, with every non-empty caption of its rows and their text vectors. Vectors are normalised
again in float32 (clip-retrieval stores float16). The whole folder is read into memory: indexes larger than memory
are built by streaming it instead (ondisk_build.py, `--on-disk`).
"""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from search.catalog import FileInfo
from search.encoders import Encoder, EncoderSpec, normalised
from search.errors import DatasetError, ModelMismatchError
from search.index_choice import IndexOptions
from search.manifest import Manifest

from .embedding_folder import DESCRIPTION_FILE
from .embedding_stream import folder_files
from .loader import taken_from
from .writer import IndexWriter

FORMAT_NAME = "embeddings"  # --format embeddings


def describe(folder: Path) -> dict | None:
    """embeddings.json of a folder `indexer export` wrote; None for other embedding folders."""
    try:
        return json.loads((Path(folder) / DESCRIPTION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_folder(folder: Path) -> tuple[list[str], np.ndarray, list[str | None], np.ndarray | None]:
    """(image path per row, image vectors, caption per row or None, text vectors or None), files paired by sorted
    name as embedding-reader pairs them. Raises DatasetError for a folder that is not in the layout."""
    import pyarrow.parquet as pq

    files = folder_files(folder)  # the layout checked, files paired
    images, texts, metadata = [f.path for f in files.images], [f.path for f in files.texts or ()], files.metadata
    paths, captions, image_parts, text_parts = [], [], [], []
    for number, (image_file, meta_file) in enumerate(zip(images, metadata)):
        table = pq.read_table(meta_file)
        if "image_path" not in table.column_names:
            raise DatasetError(f"{meta_file} has no image_path column (columns: {', '.join(table.column_names)})")
        vectors = np.load(image_file, mmap_mode="r")
        text = np.load(texts[number], mmap_mode="r") if texts else None
        if len(vectors) != table.num_rows or (text is not None and len(text) != table.num_rows):
            raise DatasetError(f"{image_file.name} and {meta_file.name} disagree on the number of rows")
        paths += [str(p) for p in table.column("image_path").to_pylist()]
        column = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * len(vectors)
        captions += [c if c else None for c in column]
        image_parts.append(normalised(vectors))
        if text is not None:
            text_parts.append(np.asarray(text, np.float32))
    text_vectors = normalised(np.concatenate(text_parts)) if text_parts else None
    return paths, np.concatenate(image_parts), captions, text_vectors


def file_info(root: Path | None, path: str) -> tuple[tuple[int, int], FileInfo | None]:
    """(width, height) from the image header and the file's identity and date (EXIF, else mtime), when the image is
    under `root`; else no identity (and no date)."""
    target = root / path if root is not None else None
    if target is None or not target.is_file():
        return (0, 0), None
    stat = target.stat()
    try:
        with Image.open(target) as image:
            size, taken = image.size, taken_from(image, stat.st_mtime_ns)
    except OSError:
        size, taken = (0, 0), taken_from(None, stat.st_mtime_ns)
    return size, replace(FileInfo.of(stat, target.read_bytes()), taken=taken)


def check_model(folder: Path, encoder: Encoder) -> dict | None:
    """embeddings.json of `folder` (None when it has none); ModelMismatchError when it names another model."""
    described = describe(folder)
    if described is not None and (EncoderSpec.from_dict(described["encoder"]) != encoder.spec
                                  or described["fingerprint"] != encoder.fingerprint):
        raise ModelMismatchError(f"{folder} was made with {EncoderSpec.from_dict(described['encoder'])} (weights "
                                 f"{described['fingerprint']}), not {encoder.spec} ({encoder.fingerprint})")
    return described


def build_from_embeddings(folder: Path | str, out: Path | str, encoder: Encoder, images_root: Path | None = None,
                          options: IndexOptions = IndexOptions(), overwrite: bool = False) -> Manifest:
    """Write the index at `out` from the vectors in `folder`. `encoder` is the model queries will use: it must be the
    one embeddings.json names (when there is one) and give vectors of the folder's width."""
    folder = Path(folder)
    described = check_model(folder, encoder)
    paths, image_vectors, captions, text_vectors = read_folder(folder)
    if image_vectors.shape[1] != encoder.dim:
        raise ModelMismatchError(f"{folder} holds {image_vectors.shape[1]}-d vectors but {encoder.spec} gives "
                                 f"{encoder.dim}-d")
    first, caption_rows = {}, {}
    for row, path in enumerate(paths):
        first.setdefault(path, row)
        if captions[row] is not None and text_vectors is not None:
            caption_rows.setdefault(path, []).append(row)
    root = Path(images_root).resolve() if images_root is not None else None
    source = {"format": FORMAT_NAME, "embeddings": str(folder.resolve()), "images": str(root) if root else None}
    with IndexWriter(Path(out), overwrite, encoder.dim, {"source": source}) as writer:
        for path, row in first.items():
            rows = caption_rows.get(path, [])
            size, file = file_info(root, path)
            writer.add(path, size, [captions[r] for r in rows], image_vectors[row],
                       text_vectors[rows] if rows else np.zeros((0, encoder.dim), np.float32), file)
        manifest = Manifest(encoder=encoder.spec, fingerprint=encoder.fingerprint, dim=encoder.dim,
                            n_images=writer.n_images, n_captions=writer.n_captions, source=source,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            precision=(described or {}).get("precision", "fp32"),
                            runtime=(described or {}).get("runtime", encoder.runtime))
        return writer.commit(manifest, options)
