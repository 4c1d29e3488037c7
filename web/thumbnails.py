"""JPEG thumbnails of catalog images, made on first request and cached on disk."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from search.images import load_image


class ThumbnailCache:
    def __init__(self, folder: Path, size: int, max_megapixels: float):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.max_megapixels = max_megapixels

    def get(self, key: str, source: Path) -> Path:
        """Path of the thumbnail of `source` under `key` (its content hash, stable across index versions); made if
        missing or older than the source. ImageReadError if the source cannot be decoded."""
        target = self.folder / f"{key}.jpg"
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            return target
        image = load_image(source, self.max_megapixels)
        image.thumbnail((self.size, self.size))
        # write beside and rename: concurrent requests for one thumbnail never read a half-written file
        self.folder.mkdir(parents=True, exist_ok=True)  # an update swaps in a new index directory without it
        handle, tmp = tempfile.mkstemp(suffix=".jpg", dir=self.folder)
        with os.fdopen(handle, "wb") as out:
            image.save(out, "JPEG", quality=85)
        os.replace(tmp, target)
        return target


def default_thumbnail_dir(index: Path) -> Path:
    folder = Path(index) / ".thumbnails"
    try:
        folder.mkdir(exist_ok=True)
        return folder
    except OSError:  # read-only index: cache elsewhere
        return Path(tempfile.mkdtemp(prefix="thumbnails-"))
