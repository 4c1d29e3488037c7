"""SQLite catalog of an index: which image and caption each vector row stands for.

images(id, path, width, height) with `path` relative to the image root; captions(id, image_id, text). Ids are the
row numbers of the vectors and of the FAISS indexes. Read connections are opened per thread (sqlite3 objects must
not cross threads), and read-only.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import DuplicateImageError

SCHEMA = """
CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, width INTEGER, height INTEGER,
                     size INTEGER, mtime_ns INTEGER, sha1 TEXT);
CREATE TABLE captions (id INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id), text TEXT NOT NULL);
CREATE INDEX captions_by_image ON captions(image_id);
"""


@dataclass(frozen=True)
class FileInfo:
    """What identifies an image file's content: size and mtime to skip unchanged files, a hash to spot moves."""
    size: int
    mtime_ns: int
    sha1: str

    @classmethod
    def of(cls, stat: os.stat_result, data: bytes) -> "FileInfo":
        """A file's identity from its stat and its bytes (read once by the caller)."""
        return cls(stat.st_size, stat.st_mtime_ns, hashlib.sha1(data).hexdigest())


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str
    width: int
    height: int
    size: int = 0
    mtime_ns: int = 0
    sha1: str = ""


@dataclass(frozen=True)
class CaptionRecord:
    id: int
    image_id: int
    text: str


class CatalogWriter:
    """Appends images and captions with consecutive ids starting at 0; nothing is durable before `commit()`."""

    def __init__(self, path: Path, n_images: int = 0, n_captions: int = 0):
        """A new catalog, or (with counts) one being continued after an interruption: rows past the counts (a batch
        whose progress was never recorded) are dropped."""
        self.conn = sqlite3.connect(path)
        if not n_images and not n_captions:
            self.conn.executescript("DROP TABLE IF EXISTS captions; DROP TABLE IF EXISTS images;" + SCHEMA)
        else:
            with self.conn:
                self.conn.execute("DELETE FROM images WHERE id >= ?", (n_images,))
                self.conn.execute("DELETE FROM captions WHERE id >= ?", (n_captions,))
        self.n_images = n_images
        self.n_captions = n_captions

    def add(self, path: str, width: int, height: int, captions: Sequence[str],
            file: FileInfo | None = None) -> tuple[int, list[int]]:
        image_id = self.n_images
        file = file or FileInfo(0, 0, "")
        try:
            self.conn.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (image_id, path, width, height, file.size, file.mtime_ns, file.sha1))
        except sqlite3.IntegrityError:
            raise DuplicateImageError(f"{path} is in the catalog already") from None
        caption_ids = list(range(self.n_captions, self.n_captions + len(captions)))
        self.conn.executemany("INSERT INTO captions VALUES (?, ?, ?)",
                              [(cid, image_id, text) for cid, text in zip(caption_ids, captions)])
        self.n_images += 1
        self.n_captions += len(captions)
        return image_id, caption_ids

    def commit(self) -> None:
        self.conn.commit()

    def close(self, commit: bool = True) -> None:
        """Commit (or, with commit=False, drop what was added since the last commit) and close."""
        if commit:
            self.conn.commit()
        self.conn.close()


class Catalog:
    """Read-only view of one version of the catalog. The file is opened once, here, so the view stays bound to that
    version even after an update renames a new one into its place (and deletes this one); threads share the
    connection under a lock (queries take well under a millisecond)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def _rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def images(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = [int(i) for i in ids]
        rows = self._select("SELECT * FROM images WHERE id IN ({})", ids)
        return {row[0]: ImageRecord(*row) for row in rows}

    def all_images(self) -> list[ImageRecord]:
        return [ImageRecord(*row) for row in self._rows("SELECT * FROM images ORDER BY id")]

    def captions_of(self, image_ids: Iterable[int]) -> dict[int, list[str]]:
        image_ids = [int(i) for i in image_ids]
        out: dict[int, list[str]] = {i: [] for i in image_ids}
        for image_id, text in self._select(
                "SELECT image_id, text FROM captions WHERE image_id IN ({}) ORDER BY id", image_ids):
            out[image_id].append(text)
        return out

    def captions(self, ids: Iterable[int]) -> dict[int, CaptionRecord]:
        ids = [int(i) for i in ids]
        rows = self._select("SELECT id, image_id, text FROM captions WHERE id IN ({})", ids)
        return {row[0]: CaptionRecord(*row) for row in rows}

    def same_content_groups(self) -> list[list[ImageRecord]]:
        """Images whose files have the same SHA-1 (byte-identical content), in groups of two or more: each group by
        id, the groups by their first id. Images without a recorded hash (built from embeddings) are left out."""
        groups: dict[str, list[ImageRecord]] = {}
        for row in self._rows("SELECT * FROM images WHERE sha1 IN (SELECT sha1 FROM images WHERE sha1 != '' "
                              "GROUP BY sha1 HAVING COUNT(*) > 1) ORDER BY id"):
            record = ImageRecord(*row)
            groups.setdefault(record.sha1, []).append(record)
        return list(groups.values())

    def hashed_images(self) -> int:
        """How many images have a recorded content hash."""
        return self._rows("SELECT COUNT(*) FROM images WHERE sha1 != ''")[0][0]

    def image_ids(self) -> list[int]:
        """Every image id, ascending (an intact catalog holds 0..n_images-1)."""
        return [row[0] for row in self._rows("SELECT id FROM images ORDER BY id")]

    def caption_links(self) -> list[tuple[int, int]]:
        """(caption id, image id) of every caption, in caption id order."""
        return [(row[0], row[1]) for row in self._rows("SELECT id, image_id FROM captions ORDER BY id")]

    def caption_image_ids(self) -> list[int]:
        """image id of every caption, in caption id order (the ground truth for recall@k)."""
        return [row[0] for row in self._rows("SELECT image_id FROM captions ORDER BY id")]

    def _select(self, sql: str, ids: list[int]) -> list[tuple]:
        rows: list[tuple] = []
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            rows += self._rows(sql.format(",".join("?" * len(chunk))), chunk)
        return rows
