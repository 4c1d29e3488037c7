"""SQLite catalog of an index: which image and caption each vector row stands for.

images(id, path, width, height, size, mtime_ns, sha1, split, taken) with `path` relative to the image root;
captions(id, image_id, text). Ids are the row numbers of the vectors and of the FAISS indexes. Read connections are
opened per thread (sqlite3 objects must not cross threads), and read-only.

Schema version 3 (manifest format 3) adds `split` (the dataset's split, NULL when unknown), `taken` (POSIX seconds:
EXIF DateTimeOriginal, else the file's mtime; NULL when no file was seen) with indexes for filters, and two FTS5 keyword
indexes built when the writer closes: `image_words(captions, name)` (rowid = image id: all its captions, its path) and
`caption_words(text)` (rowid = caption id). Version-2 catalogs still answer everything else; what needs version 3
raises IndexFormatError naming `python -m indexer migrate`, which calls `upgrade_catalog`. Keyword search: see
`Catalog.keyword_images`. All of the project's SQL is in this module.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from .errors import DuplicateImageError, IndexFormatError
from .keywords import match_expression

if TYPE_CHECKING:  # query imports images (PIL): not needed to read a catalog
    from .query import Filters

SCHEMA_VERSION = 3  # PRAGMA user_version of catalogs written by this module
SCHEMA = """
CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, width INTEGER, height INTEGER,
                     size INTEGER, mtime_ns INTEGER, sha1 TEXT, split TEXT, taken INTEGER);
CREATE TABLE captions (id INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id), text TEXT NOT NULL);
CREATE INDEX captions_by_image ON captions(image_id);
"""
V3_COLUMNS = (("split", "TEXT"), ("taken", "INTEGER"))  # what version 3 added to images (ALTER TABLE in upgrades)
# path prefixes use the UNIQUE index on path (a range scan); split and date filters theirs; ANALYZE lets the planner
# pick the selective one
FILTER_INDEXES = """
CREATE INDEX IF NOT EXISTS images_by_split ON images(split);
CREATE INDEX IF NOT EXISTS images_by_taken ON images(taken);
"""
# words are runs of letters and digits: `_ - . /` split file names ("holiday/beach_2019.jpg" → holiday beach 2019 jpg;
# unicode61 treats them as separators already, named here for the reader); case and diacritics are folded; no
# stemming, so a keyword match means the word itself is there. Contentless: the text stays in the tables above.
TOKENIZER = "unicode61 remove_diacritics 2 separators '_-./'"
KEYWORD_SCHEMA = f"""
DROP TABLE IF EXISTS image_words;
DROP TABLE IF EXISTS caption_words;
CREATE VIRTUAL TABLE image_words USING fts5(captions, name, content='', tokenize="{TOKENIZER}");
CREATE VIRTUAL TABLE caption_words USING fts5(text, content='', tokenize="{TOKENIZER}");
INSERT INTO image_words(rowid, captions, name)
    SELECT images.id, COALESCE((SELECT group_concat(text, ' . ') FROM captions WHERE image_id = images.id), ''), path
    FROM images ORDER BY images.id;
INSERT INTO caption_words(rowid, text) SELECT id, text FROM captions ORDER BY id;
"""
MAX_REMEMBERED_WORDS = 100_000  # word frequencies kept per keyword table
FIELDS = ("caption", "file name")  # what a keyword match of an image can be in (image_words' columns, in order)
MIGRATE_HINT = "run: python -m indexer migrate --index {index}"


@dataclass(frozen=True)
class FileInfo:
    """What identifies an image file's content: size and mtime to skip unchanged files, a hash to spot moves; and
    when the photo was taken (POSIX seconds; EXIF DateTimeOriginal, else the mtime; None when unknown)."""
    size: int
    mtime_ns: int
    sha1: str
    taken: int | None = None

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
    split: str | None = None  # the dataset's split (Karpathy, Flickr8k); None when unknown or a version-2 catalog
    taken: int | None = None  # POSIX seconds (see FileInfo); None when unknown or a version-2 catalog


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
                _add_v3_columns(self.conn)  # a work directory an earlier version of this program began
                self.conn.execute("DELETE FROM images WHERE id >= ?", (n_images,))
                self.conn.execute("DELETE FROM captions WHERE id >= ?", (n_captions,))
        self.n_images = n_images
        self.n_captions = n_captions

    def add(self, path: str, width: int, height: int, captions: Sequence[str],
            file: FileInfo | None = None, split: str | None = None) -> tuple[int, list[int]]:
        """One image (its date from `file.taken`) and its captions; (image id, caption ids)."""
        image_id = self.n_images
        file = file or FileInfo(0, 0, "")
        try:
            self.conn.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (image_id, path, width, height, file.size, file.mtime_ns, file.sha1, split, file.taken))
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

    def identities(self, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """{id: (path, SHA-1 or "")} of images added so far (committed or not), for work done before `close`."""
        found: dict[int, tuple[str, str]] = {}
        for start in range(0, len(ids), 500):  # under SQLite's bound-parameter limit
            chunk = [int(i) for i in ids[start:start + 500]]
            found.update((row[0], (row[1], row[2] or "")) for row in self.conn.execute(
                f"SELECT id, path, sha1 FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def close(self, commit: bool = True) -> None:
        """Complete the catalog (filter and keyword indexes over every row), commit and close; with commit=False, drop
        what was added since the last commit and close (an interruption: the keyword index is built by the close
        that completes the catalog)."""
        if commit:
            self.conn.commit()
            _complete(self.conn)
        self.conn.close()


def _add_v3_columns(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(images)")}
    for name, kind in V3_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")


def _complete(conn: sqlite3.Connection) -> None:
    """Filter indexes, planner statistics, keyword indexes and the schema version of a finished catalog."""
    conn.executescript(f"BEGIN; {FILTER_INDEXES} {KEYWORD_SCHEMA} COMMIT; ANALYZE; PRAGMA user_version = "
                       f"{SCHEMA_VERSION};")


def upgrade_catalog(path: Path, taken: Mapping[int, int | None]) -> None:
    """Turn the version-2 catalog file at `path` (a copy in a migration's work directory) into version 3 in place:
    the new columns (split NULL; taken from `taken`, image id → POSIX seconds or None), filter and keyword indexes.
    Ids, paths and captions are unchanged."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            _add_v3_columns(conn)
            conn.executemany("UPDATE images SET taken = ? WHERE id = ?",
                             [(value, int(image_id)) for image_id, value in taken.items()])
        _complete(conn)
    finally:
        conn.close()


class Catalog:
    """Read-only view of one version of the catalog. The file is opened once, here, so the view stays bound to that
    version even after an update renames a new one into its place (and deletes this one); threads share the
    connection under a lock (queries take well under a millisecond)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        tables = {row[0] for row in self._rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {row[1] for row in self._rows("PRAGMA table_info(images)")}
        self.version = 3 if {"image_words", "caption_words"} <= tables and {"split", "taken"} <= columns else 2
        self._columns: _FilterColumns | None = None  # read on the first filter_ids
        self._frequencies: dict[str, dict[str, int]] = {}  # per keyword table: word → documents holding it
        self._columns_lock = threading.Lock()

    def _rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the file now (otherwise when the view is garbage-collected)."""
        with self._lock:
            self._db.close()

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

    def _need_v3(self, what: str) -> None:
        if self.version < 3:
            raise IndexFormatError(f"{what} needs the index format 3 (this index is format 2); "
                                   + MIGRATE_HINT.format(index=self.path.parent))

    def filter_ids(self, filters: "Filters") -> np.ndarray:
        """Ids (sorted int64) of the images `filters` allow: path prefix (literal: `%` and `_` are characters),
        split, width/height bounds and taken range (inclusive; images without a date never pass a date bound).
        Split and date need format 3 (IndexFormatError with the migrate command on a format-2 index).

        Cost: the path prefix is a range scan of the path index (proportional to the images in it); the other
        conditions are numpy comparisons over columns read once per catalog version, on the first filter (~20 bytes
        an image: 2 MB and well under a second for 100k images)."""
        if filters.split is not None:
            self._need_v3("a split filter")
        if filters.taken_after is not None or filters.taken_before is not None:
            self._need_v3("a date filter")
        columns = self._filter_columns()
        keep = np.ones(len(columns.ids), bool)
        if filters.path_prefix:
            bound = _prefix_bound(filters.path_prefix)
            sql = "SELECT group_concat(id, ' ') FROM images WHERE path >= ?" + (" AND path < ?" if bound else "")
            found = self._rows(sql, (filters.path_prefix, bound) if bound else (filters.path_prefix,))[0][0]
            inside = np.zeros(len(columns.ids), bool)
            if found:
                inside[np.searchsorted(columns.ids, np.array(found.split(), np.int64))] = True
            keep &= inside
        if filters.split is not None:
            keep &= columns.split == columns.split_codes.get(filters.split, -1)
        for value, column, at_least in ((filters.min_width, columns.width, True),
                                        (filters.max_width, columns.width, False),
                                        (filters.min_height, columns.height, True),
                                        (filters.max_height, columns.height, False)):
            if value is not None:
                keep &= column >= value if at_least else column <= value
        if filters.taken_after is not None or filters.taken_before is not None:
            keep &= columns.dated
            if filters.taken_after is not None:
                keep &= columns.taken >= filters.taken_after
            if filters.taken_before is not None:
                keep &= columns.taken <= filters.taken_before
        return columns.ids[keep]

    def _filter_columns(self) -> "_FilterColumns":
        with self._columns_lock:
            if self._columns is None:
                extra = "taken, split" if self.version >= 3 else "NULL, NULL"
                rows = self._rows(f"SELECT id, width, height, {extra} FROM images ORDER BY id")
                self._columns = _FilterColumns.of(rows)
            return self._columns

    def taken(self, ids: Iterable[int]) -> dict[int, int | None]:
        """When each image was taken (POSIX seconds, None when unknown), for sorting by date; format 3."""
        self._need_v3("sorting by date")
        return dict(self._select("SELECT id, taken FROM images WHERE id IN ({})", [int(i) for i in ids]))

    def keyword_images(self, text: str, limit: int, allowed: np.ndarray | None = None,
                       exclude: Sequence[str] = ()) -> list[tuple[int, float, tuple[str, ...]]]:
        """Images whose captions or file path hold any word of `text` (words OR-ed: more and rarer words rank
        higher), none of `exclude`, and (when given) whose id is in `allowed`: [(image id, score, fields)], best first,
        at most `limit`; ties by id. score = BM25 (FTS5's, negated: higher is better) over the image's captions and its
        path; fields: which of "caption", "file name" hold a word. `text` is words, not FTS syntax (search/keywords.py);
        no words → []. Format 3."""
        self._need_v3("keyword search")
        expression = match_expression(text, exclude, *self._frequency("image_words"))
        if expression is None or limit <= 0:
            return []
        # a column's own BM25 (the other weighted 0) is below zero when it holds a word; SQLite computes these two
        # for the rows kept after the sort only (a second query per row would run the match again for each)
        ranked = self._ranked("SELECT rowid, -bm25(image_words) AS score, bm25(image_words, 1, 0), "
                              "bm25(image_words, 0, 1) FROM image_words WHERE image_words MATCH ? "
                              "ORDER BY score DESC, rowid", expression, limit, allowed, lambda row: row[0])
        return [(image_id, score, tuple(f for f, part in zip(FIELDS, parts) if part < 0))
                for image_id, score, *parts in ranked]

    def keyword_captions(self, text: str, limit: int, allowed_images: np.ndarray | None = None,
                         exclude: Sequence[str] = ()) -> list[tuple[int, float, int]]:
        """Captions holding any word of `text` (as `keyword_images`), none of `exclude`, of images in
        `allowed_images` when given: [(caption id, score, image id)], best first, at most `limit`. Format 3."""
        self._need_v3("keyword search")
        expression = match_expression(text, exclude, *self._frequency("caption_words"))
        if expression is None or limit <= 0:
            return []
        if allowed_images is not None:  # each match's image is needed to filter: joined
            return self._ranked("SELECT caption_words.rowid, -bm25(caption_words) AS score, captions.image_id FROM "
                                "caption_words JOIN captions ON captions.id = caption_words.rowid WHERE caption_words "
                                "MATCH ? ORDER BY score DESC, caption_words.rowid", expression, limit, allowed_images,
                                lambda row: row[2])
        ranked = self._ranked("SELECT rowid, -bm25(caption_words) AS score FROM caption_words WHERE caption_words "
                              "MATCH ? ORDER BY score DESC, rowid", expression, limit, None, None)
        images = dict(self._select("SELECT id, image_id FROM captions WHERE id IN ({})", [row[0] for row in ranked]))
        return [(caption_id, score, images[caption_id]) for caption_id, score in ranked]

    def _frequency(self, table: str) -> tuple:
        """(frequency(word) → documents of `table` holding it, the number of documents), for
        keywords.match_expression; looked up in an fts5vocab view of the table and remembered."""
        known = self._frequencies.setdefault(table, {})
        with self._lock:
            if "" not in known:  # first use: a temporary view (the file stays read-only) and the document count
                self._db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{table}_vocab USING fts5vocab(main, "
                                 f"{table}, 'row')")
                source = "images" if table == "image_words" else "captions"
                known[""] = self._db.execute(f"SELECT COUNT(*) FROM {source}").fetchone()[0]

        def frequency(word: str) -> int:
            if word not in known:
                with self._lock:
                    row = self._db.execute(f"SELECT doc FROM temp.{table}_vocab WHERE term = ?", (word,)).fetchone()
                if len(known) > MAX_REMEMBERED_WORDS:  # queries are user input: keep the memory bounded
                    known.clear()
                    known[""] = n_docs
                known[word] = row[0] if row else 0  # a dict is safe to grow from threads (one assignment)
            return known[word]

        n_docs = known[""]
        return frequency, n_docs

    def _ranked(self, sql: str, expression: str, limit: int, allowed: np.ndarray | None, image_of) -> list[tuple]:
        """The first `limit` rows of a ranked keyword query whose image is allowed (read lazily: a filter that lets
        most images through stops early)."""
        if allowed is None:
            return self._rows(sql + " LIMIT ?", (expression, int(limit)))
        allowed = np.asarray(allowed, np.int64)
        rows: list[tuple] = []
        if not len(allowed):
            return rows
        admitted = np.zeros(int(allowed.max()) + 1, bool)  # a lookup table: cheaper to build than a set of ints
        admitted[allowed] = True
        with self._lock:
            cursor = self._db.execute(sql, (expression,))
            try:
                for row in cursor:
                    image_id = image_of(row)
                    if image_id < len(admitted) and admitted[image_id]:
                        rows.append(row)
                        if len(rows) == limit:
                            break
            finally:
                cursor.close()
        return rows

    def _select(self, sql: str, ids: list[int]) -> list[tuple]:
        rows: list[tuple] = []
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            rows += self._rows(sql.format(",".join("?" * len(chunk))), chunk)
        return rows


@dataclass(frozen=True)
class _FilterColumns:
    """What filters compare, one entry per image in id order: width, height, date (`dated` false where unknown) and
    split (codes into `split_codes`; -1 unknown)."""
    ids: np.ndarray
    width: np.ndarray
    height: np.ndarray
    taken: np.ndarray
    dated: np.ndarray
    split: np.ndarray
    split_codes: dict

    @classmethod
    def of(cls, rows: list[tuple]) -> "_FilterColumns":
        ids, width, height, taken, split = zip(*rows) if rows else ((),) * 5
        codes = {name: code for code, name in enumerate(sorted({s for s in split if s is not None}))}
        return cls(np.array(ids, np.int64), np.array(width, np.int64), np.array(height, np.int64),
                   np.array([t if t is not None else 0 for t in taken], np.int64),
                   np.array([t is not None for t in taken], bool),
                   np.array([codes.get(s, -1) if s is not None else -1 for s in split], np.int32), codes)


def _prefix_bound(prefix: str) -> str | None:
    """The least string above every string starting with `prefix` (SQLite compares TEXT by its UTF-8 bytes, which
    order like code points): the prefix with its last code point raised by one; None when there is none."""
    while prefix:
        code = ord(prefix[-1]) + 1
        if code == 0xD800:  # surrogates are not characters (and not UTF-8): the next one up
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None
