"""`python -m indexer migrate --index I`: upgrade a format-2 index to format 3 (search/manifest.py) in place.

Format 3 adds to the catalog each image's split (NULL here: a migration reads no dataset; `indexer update` fills it)
and date (EXIF DateTimeOriginal, else the file's mtime, from the image files when their folder is there, else NULL),
plus the filter and keyword indexes (search/catalog.py). Nothing else changes: vectors, ids and FAISS files are
hard links to the old ones (byte-identical by construction), so a migration costs the catalog's size in disk.

Atomic like a build: under the writer lock, the new version is assembled in the work directory `.NAME.partial` and
swapped into place (search/atomic.py); readers see the old index or the migrated one, and a failure leaves the old one.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from search.atomic import swap_into_place
from search.catalog import Catalog, ImageRecord, upgrade_catalog
from search.errors import DatasetError, EngineError
from search.images import ALLOWED_FORMATS
from search.layout import CATALOG_NAME, partial_dir
from search.manifest import FORMAT_VERSION, read_manifest

from .loader import exif_taken
from .lock import WriterLock
from .writer import with_relevance


@dataclass(frozen=True)
class MigrateReport:
    index: Path
    migrated: bool  # False: the index was in the current format already
    from_version: int
    n_images: int = 0
    dated_by_exif: int = 0
    dated_by_mtime: int = 0
    undated: int = 0  # no file found (or no image folder): NULL date
    images_root: Path | None = None

    def summary(self) -> str:
        if not self.migrated:
            return f"{self.index} is already in index format {FORMAT_VERSION}; nothing to do"
        where = f"the files in {self.images_root}" if self.images_root else "no image folder (none recorded)"
        return (f"migrated {self.index} from index format {self.from_version} to {FORMAT_VERSION}: dates of "
                f"{self.n_images:,} images from {where}: {self.dated_by_exif:,} EXIF, {self.dated_by_mtime:,} file "
                f"time, {self.undated:,} unknown; keyword index built; vectors and FAISS files unchanged")


def migrate_index(index: Path | str, images: Path | str | None = None) -> MigrateReport:
    """Upgrade the index at `index` to the current format (see the module docstring); `images`: the image root
    (default: the one its manifest records). IndexFormatError for a missing or unreadable index, WriterBusyError when
    another writer holds it, EngineError when an interrupted build's work directory is in the way."""
    index = Path(index)
    with WriterLock(index):
        manifest = read_manifest(index)
        if manifest.format_version >= FORMAT_VERSION:
            return MigrateReport(index, False, manifest.format_version)
        work = partial_dir(index)
        if work.exists():
            raise EngineError(f"an interrupted build or update of {index} waits in {work}: finish it with --resume "
                              f"(which writes the new format) or delete that folder, then migrate")
        root = Path(images) if images is not None else (
            Path(manifest.source["images"]) if manifest.source.get("images") else None)
        if images is not None and not root.is_dir():
            raise DatasetError(f"{root}: image folder not found")
        catalog = Catalog(index / CATALOG_NAME)
        try:
            records = catalog.all_images()
        finally:
            catalog.close()
        dates, sources = _dates(records, root if root is not None and root.is_dir() else None)
        try:
            _link_copy(index, work)
            upgrade_catalog(work / CATALOG_NAME, dates)
            with_relevance(replace(manifest, format_version=FORMAT_VERSION), work).write(work)
            swap_into_place(work, index)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return MigrateReport(index, True, manifest.format_version, len(records), sources.count("exif"),
                         sources.count("mtime"), sources.count(None), root if root is not None and root.is_dir()
                         else None)


def _dates(records: list[ImageRecord], root: Path | None) -> tuple[dict[int, int | None], list[str | None]]:
    """Image id → POSIX seconds (EXIF DateTimeOriginal, else the file's mtime; None without a file), and where each
    date came from ("exif", "mtime" or None)."""
    dates, sources = {}, []
    for record in records:
        taken, source = None, None
        path = root / record.path if root is not None else None
        if path is not None and path.is_file():
            try:
                with Image.open(path, formats=ALLOWED_FORMATS) as image:
                    taken = exif_taken(image)
            except (OSError, SyntaxError, ValueError):
                pass  # not readable as an image now: dated by its file time
            source = "exif" if taken is not None else "mtime"
            if taken is None:
                taken = path.stat().st_mtime_ns // 1_000_000_000
        dates[record.id] = taken
        sources.append(source)
    return dates, sources


def _link_copy(index: Path, work: Path) -> None:
    """The index's files in `work`: the catalog copied (it is rewritten), everything else hard-linked (copied where
    the filesystem has no hard links)."""
    work.mkdir()
    for entry in index.iterdir():
        target = work / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        elif entry.name == CATALOG_NAME:
            shutil.copy2(entry, target)
        else:
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)
