"""The on-disk layout of an index: every file of an index directory, and every file kept beside it, is named here.

    PARENT/NAME/                  the index; a build or update replaces it whole (readers see one complete version)
        manifest.json             what the index is (search/manifest.py); written last
        catalog.sqlite            which image and caption each vector row stands for (search/catalog.py)
        images.faiss              FAISS indexes over the vectors (search/vector_index.py)
        captions.faiss
        image_vectors.npy         raw float32 vectors, row = id (float16 in on-disk indexes built from a float16
        caption_vectors.npy       embedding folder)
        images.ivfdata            the inverted lists of an on-disk IVF (indexer/ondisk_build.py), beside its .faiss
        captions.ivfdata          file (FAISS finds them there: IO_FLAG_ONDISK_SAME_DIR)
    PARENT/.NAME.partial/         work directory of a build or update (indexer/writer.py): the files above as they
        progress.json             are written, what a --resume may trust,
        image_vectors.f32         and the vectors appended batch by batch
        caption_vectors.f32
        ray-parts/                the finished partitions of an --engine ray build, until they are written
        shards/                   an on-disk build's index shards, merged into the .ivfdata files and deleted
    PARENT/.NAME.old-XXXXXXXX/    the previous version, for the instant of a swap (search/atomic.py)
    PARENT/.NAME.lock             the writer lock (indexer/lock.py), also beside model and demo folders; never deleted
    PARENT/.NAME.thumbnails/      the web app's thumbnail cache (web/thumbnails.py), kept across index versions

Only this module spells these names; the modules named above read and write the files.
"""
from __future__ import annotations

from pathlib import Path

KINDS = ("images", "captions")  # the two vector collections of an index, in id-space order of the files below

MANIFEST_NAME = "manifest.json"
CATALOG_NAME = "catalog.sqlite"
FAISS_FILES = {"images": "images.faiss", "captions": "captions.faiss"}
VECTOR_FILES = {"images": "image_vectors.npy", "captions": "caption_vectors.npy"}
INDEX_FILES = (MANIFEST_NAME, CATALOG_NAME, *FAISS_FILES.values(), *VECTOR_FILES.values())
IVFDATA_FILES = {"images": "images.ivfdata", "captions": "captions.ivfdata"}  # on-disk indexes only
SHARDS_DIR = "shards"

PROGRESS_NAME = "progress.json"
RAW_VECTOR_FILES = {"images": "image_vectors.f32", "captions": "caption_vectors.f32"}
RAY_PARTS_DIR = "ray-parts"  # in the work directory: part-NNNNNN.npz, one per finished partition of samples

# kept beside a target PARENT/NAME as PARENT/.NAME.ROLE: outside it, so swapping a new version in leaves them alone
PARTIAL, LOCK, THUMBNAILS, OLD = "partial", "lock", "thumbnails", "old-"


def beside(target: Path | str, role: str) -> Path:
    """`PARENT/.NAME.ROLE` for the target `PARENT/NAME` (the path as given: callers resolve it if they must)."""
    target = Path(target)
    return target.parent / f".{target.name}.{role}"


def partial_dir(index: Path | str) -> Path:
    """The work directory of a build or update of `index`."""
    return beside(index, PARTIAL)


def lock_file(target: Path | str) -> Path:
    """The writer-lock file of `target` (an index, a model folder, the demo folder)."""
    return beside(target, LOCK)


def thumbnails_dir(index: Path | str) -> Path:
    """The thumbnail cache of `index`."""
    return beside(index, THUMBNAILS)
