"""`indexer build --format embeddings --on-disk`: an index larger than memory, built by streaming an embedding folder.

1. One pass over the folder (embedding_stream.py) writes the catalog and the raw vectors of the index directory,
   re-normalised in float32 chunk by chunk and stored in the folder's dtype (float16 from clip-retrieval: half the
   disk of float32); images are grouped from consecutive rows of the same image_path.
2. Per kind, from those raw files (ondisk_index_build.py): train the IVF(-PQ) quantiser once on a sample drawn from
   all of it, fill shards with global ids (here one after another, or as Ray tasks with `--engine ray`), merge them
   into NAME.faiss + NAME.ivfdata, tune nprobe to the target recall@10 (with exact re-ranking of k x refine
   candidates, search/ondisk_index.py) against exact search computed by streaming.
3. The manifest records per kind {"params": {"nprobe", "refine"}, "recall_at_10", "memory_bytes", "on_disk": true};
   search/store.py opens such indexes memory-mapped.

Everything is written in the work directory `.NAME.partial` under the writer lock and swapped into place at the end; a
failure or interruption deletes the work directory (there is no --resume for this path) and leaves the index that was
there untouched. Memory: every step holds at most a share of the budget (Budget in ondisk_index_build.py), plus what
SQLite and FAISS keep (the coarse centroids, PQ tables).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from search.atomic import swap_into_place
from search.catalog import CatalogWriter
from search.encoders import Encoder, normalised
from search.errors import DatasetError, DuplicateImageError, ModelMismatchError
from search.index_choice import DEFAULT_TARGET_RECALL
from search.layout import CATALOG_NAME, FAISS_FILES, IVFDATA_FILES, KINDS, SHARDS_DIR, VECTOR_FILES, partial_dir
from search.manifest import Manifest
from search.ondisk_index import REFINE_PARAM, OnDiskIndex

from search.vector_index import VectorIndex

from .embedding_stream import FolderFiles, NpyFile, NpyWriter, folder_files, read_images
from .from_embeddings import FORMAT_NAME, check_model, file_info
from .lock import WriterLock
from .ondisk_index_build import (DEFAULT_MEMORY_BUDGET, Budget, default_refine, fill_shards, merge_shards,
                                 plan_ondisk, trained_index, tune, tuning_queries)
from .writer import check_output_dir, with_relevance

log = logging.getLogger(__name__)

STORED_DTYPES = (np.float16, np.float32)  # raw vectors keep the folder's dtype when it is one of these

@dataclass(frozen=True)
class OnDiskOptions:
    factory: str | None = None  # --index-type (an IVF type); default plan_ondisk
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # --memory-budget, bytes
    target_recall: float = DEFAULT_TARGET_RECALL
    refine: int | None = None  # candidates per result re-scored exactly; default: 10 for PQ/SQ codes, 1 for Flat
    engine: str = "local"  # "ray": shards filled as Ray tasks
    ray_address: str | None = None
    workers: int | None = None  # CPUs of the local Ray started when there is no address
    shard_rows: int | None = None  # default: from the budget
    progress: bool = False  # tqdm bars on stderr (the CLI's choice)
    seed: int = 0

def should_build_on_disk(folder: Path | str, memory_budget: int | None) -> bool:
    """Whether the folder's vectors, as float32, exceed the budget (then the in-memory build cannot hold them)."""
    return memory_budget is not None and folder_files(folder).float32_bytes() > memory_budget

def build_on_disk(folder: Path | str, out: Path | str, encoder: Encoder, images_root: Path | None = None,
                  options: OnDiskOptions = OnDiskOptions(), overwrite: bool = False) -> Manifest:
    """Write the on-disk index at `out` from the embedding folder `folder` (see the module docstring). Raises
    DatasetError / ModelMismatchError for a bad folder, IndexExistsError for a target that exists."""
    folder, out = Path(folder), Path(out)
    described = check_model(folder, encoder)
    files = folder_files(folder)
    if files.dim != encoder.dim:
        raise ModelMismatchError(f"{folder} holds {files.dim}-d vectors but {encoder.spec} gives {encoder.dim}-d")
    root = Path(images_root).resolve() if images_root is not None else None
    source = {"format": FORMAT_NAME, "embeddings": str(folder.resolve()), "images": str(root) if root else None}
    budget = Budget(options.memory_budget)
    with WriterLock(out):
        check_output_dir(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_dir(out)
        if tmp.exists():
            log.warning("discarding the interrupted build in %s", tmp)
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            redirect = logging_redirect_tqdm() if options.progress else contextlib.nullcontext()
            with redirect:
                n_images, n_captions = _write_rows(files, tmp, root, budget, options.progress)
                reports = build_ondisk_indexes(tmp, budget, options, encoder.dim)
            manifest = Manifest(encoder=encoder.spec, fingerprint=encoder.fingerprint, dim=encoder.dim,
                                n_images=n_images, n_captions=n_captions, source=source,
                                image_factory=reports["images"].pop("factory"),
                                caption_factory=reports["captions"].pop("factory"), indexes=reports,
                                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                precision=(described or {}).get("precision", "fp32"),
                                runtime=(described or {}).get("runtime", encoder.runtime))
            manifest = with_relevance(manifest, tmp, options.seed)
            manifest.write(tmp)
            swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest

def _write_rows(files: FolderFiles, tmp: Path, root: Path | None, budget: Budget, progress: bool) -> tuple[int, int]:
    """Catalog and raw vectors of every image and caption; (images, captions)."""
    dtype = files.dtype if files.dtype in STORED_DTYPES else np.dtype(np.float32)
    writers = {kind: NpyWriter(tmp / VECTOR_FILES[kind], files.dim, dtype) for kind in KINDS}
    catalog = CatalogWriter(tmp / CATALOG_NAME)
    try:
        with tqdm(total=files.rows, desc="reading embeddings", unit="row", unit_scale=True,
                  disable=not progress) as bar:
            for block in read_images(files, budget.chunk_rows(files.dim)):
                for path, captions in zip(block.paths, block.captions):
                    size, file = file_info(root, path)
                    try:
                        catalog.add(path, size[0], size[1], captions, file)
                    except DuplicateImageError:
                        raise DatasetError(f"the rows of image {path} are not consecutive in the embedding folder; an "
                                           f"on-disk build needs each image's rows together (as indexer export and "
                                           f"clip-retrieval write them)") from None
                catalog.commit()
                writers["images"].append(normalised(block.image_vectors))
                writers["captions"].append(normalised(block.caption_vectors))
                bar.update(block.rows)
    finally:
        for writer in writers.values():
            writer.close()
        catalog.close()
    return catalog.n_images, catalog.n_captions

def build_ondisk_indexes(tmp: Path, budget: Budget, options: OnDiskOptions, dim: int) -> dict:
    """Per kind, the on-disk index and its manifest entry (an empty kind gets an empty exact index)."""
    raw = {kind: NpyFile.open(tmp / VECTOR_FILES[kind]) for kind in KINDS}
    reports = {}
    for kind, other in zip(KINDS, reversed(KINDS)):  # each index is tuned on queries of the other kind
        vectors = raw[kind]
        if not vectors.rows:
            VectorIndex.build(np.zeros((0, dim), np.float32)).save(tmp / FAISS_FILES[kind])
            reports[kind] = {"factory": "Flat", "params": {}, "recall_at_10": 1.0, "memory_bytes": 0}
            continue
        factory = options.factory or plan_ondisk(vectors.rows, dim)
        refine = options.refine or default_refine(factory)
        trained = trained_index(vectors, factory, "ip", budget, options.seed, options.progress)
        shards = _fill(trained, vectors, tmp / SHARDS_DIR / kind, budget, options)
        merge_shards(trained, shards, tmp / FAISS_FILES[kind], tmp / IVFDATA_FILES[kind], options.progress)
        del trained  # its read-write mapping of the merged lists; the search below maps them read-only
        shutil.rmtree(tmp / SHARDS_DIR)
        index = OnDiskIndex.load(tmp / FAISS_FILES[kind], np.load(tmp / VECTOR_FILES[kind], mmap_mode="r"), factory,
                                 "ip", {REFINE_PARAM: refine})
        queries = tuning_queries(vectors, raw[other], budget, options.seed)
        recall = tune(index, vectors, queries, options.target_recall, budget, options.progress)
        log.info("%s index %s on disk, tuned to %s: recall@10 %.3f against exact search", kind, factory, index.params,
                 recall)
        reports[kind] = {"factory": factory, "params": dict(index.params), "recall_at_10": recall,
                         "memory_bytes": (tmp / FAISS_FILES[kind]).stat().st_size, "on_disk": True,
                         "disk_bytes": (tmp / IVFDATA_FILES[kind]).stat().st_size}
        del index
    return reports

def _fill(trained, vectors: NpyFile, shard_dir: Path, budget: Budget, options: OnDiskOptions) -> list[str]:
    if options.engine != "ray":
        return fill_shards(trained, vectors, shard_dir, budget, options.shard_rows, 0, options.progress)
    from .ray_cluster import ray_session

    with ray_session(options.ray_address, options.workers) as resources:
        return fill_shards(trained, vectors, shard_dir, budget, options.shard_rows, max(1, resources["CPU"]),
                           options.progress)

def commit_on_disk(tmp: Path, raw_files: dict, dim: int, options: OnDiskOptions) -> dict:
    """For a build that encoded images (IndexWriter.commit with --on-disk): the raw float32 vectors `raw_files`
    ({kind: headerless .f32 file}) become the index directory's .npy files, copied a chunk at a time, then the on-disk
    indexes are built from them; their manifest entries per kind (factory included)."""
    budget = Budget(options.memory_budget)
    rows = budget.chunk_rows(dim)
    for kind, raw in raw_files.items():
        writer = NpyWriter(tmp / VECTOR_FILES[kind], dim, np.float32)
        try:
            with open(raw, "rb") as source:
                while chunk := source.read(rows * dim * 4):
                    writer.append(np.frombuffer(chunk, np.float32).reshape(-1, dim))
        finally:
            writer.close()
    return build_ondisk_indexes(tmp, budget, options, dim)
