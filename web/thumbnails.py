"""JPEG thumbnails of catalog images, made on first request and cached on disk."""
from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

from search.atomic import write_atomic
from search.images import load_image
from search.layout import thumbnails_dir

log = logging.getLogger(__name__)


class ThumbnailCache:
    def __init__(self, folder: Path, size: int, max_megapixels: float):
        self.folder = Path(folder).resolve()  # never relative: Flask's send_file would resolve it elsewhere
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.max_megapixels = max_megapixels

    def get(self, key: str, source: Path) -> Path | io.BytesIO:
        """The thumbnail of `source` under `key` (its content hash, stable across index versions): the cached file,
        made if missing or older than the source; the JPEG bytes in memory when the cache cannot be written (the
        request still succeeds). ImageReadError if the source cannot be decoded."""
        target = self.folder / f"{key}.jpg"
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            return target
        image = load_image(source, self.max_megapixels)
        image.thumbnail((self.size, self.size))
        data = io.BytesIO()
        image.save(data, "JPEG", quality=85)
        try:  # write beside and rename: concurrent requests for one thumbnail never read a half-written file
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(target, data.getvalue())
            return target
        except OSError as exc:
            log.warning("thumbnail cache %s not writable (%s); serving from memory", self.folder, exc)
            data.seek(0)
            return data


def default_thumbnail_dir(index: Path) -> Path:
    """`.NAME.thumbnails` beside the index directory: outside it, so an update that swaps in a new index version
    keeps the cache (thumbnails are keyed by content hash) and never pulls the folder away under a writer."""
    index = Path(index).resolve()
    folder = thumbnails_dir(index)
    try:
        folder.mkdir(exist_ok=True)
        return folder
    except OSError:  # read-only location: cache elsewhere
        return Path(tempfile.mkdtemp(prefix="thumbnails-"))
