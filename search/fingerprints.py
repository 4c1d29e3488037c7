"""Weights fingerprints (and embedding widths) remembered across processes.

Hashing every tensor of a ViT-B-32 takes about a second and measuring its embedding width takes a forward pass, and
every query process needs both to check the model against its index. So what a load of a model measured is stored
against the identity of the files it was loaded from, plus the names and library versions that turned those files
into tensors. A file's identity is its resolved path, size, mtime_ns, device, inode and ctime_ns: rewriting,
replacing or even touching it gives a new identity, so the next load measures again.

The store is one small JSON file, $XDG_CACHE_HOME (default ~/.cache)/image-text-retrieval/fingerprints.json. It only
saves time: when it is missing, corrupt or not writable everything is computed as if there were no cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Iterable

from .atomic import write_atomic

log = logging.getLogger(__name__)

APP_DIR = "image-text-retrieval"
CACHE_FILE = "fingerprints.json"
MAX_ENTRIES = 256  # oldest dropped first; one entry per distinct weights file in use
FACTS = {"fingerprint": str, "dim": int}  # what an entry may hold


def app_cache_dir() -> Path:
    """$XDG_CACHE_HOME (default ~/.cache)/image-text-retrieval: every cache of this project lives under it."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / APP_DIR


def cache_path() -> Path:
    return app_cache_dir() / CACHE_FILE


def file_identity(path: str | os.PathLike) -> list | None:
    """[resolved path, size, mtime_ns, device, inode, ctime_ns] of a regular file; None when it cannot be stat'ed."""
    try:
        resolved = Path(path).resolve()
        info = resolved.stat()
    except (OSError, RuntimeError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return [str(resolved), info.st_size, info.st_mtime_ns, info.st_dev, info.st_ino, info.st_ctime_ns]


def weights_key(names: dict, files: Iterable[str | os.PathLike]) -> str | None:
    """A cache key for weights built from `files` as `names` describe (model, tag, library versions); None when any
    file is missing, i.e. the weights are not reproducible from files."""
    identities = [file_identity(f) for f in files]
    if not identities or any(i is None for i in identities):
        return None
    blob = json.dumps({"names": names, "files": identities}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _read() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(entries: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # readers see the old or the new file; a lost concurrent update costs one rehash
        write_atomic(path, json.dumps(entries, indent=1))
    except OSError as exc:
        log.debug("fingerprint cache not written (%s)", exc)


def remembered(key: str | None) -> dict:
    """What was stored under `key`: {"fingerprint": str, "dim": int}, either missing when unknown or malformed."""
    entry = _read().get(key) if key is not None else None
    if not isinstance(entry, dict):
        return {}
    return {name: entry[name] for name, kind in FACTS.items() if type(entry.get(name)) is kind}


def remember(key: str | None, label: str, **facts) -> None:
    """Store `facts` under `key` beside what is already there; nothing when `key` is None."""
    if key is None:
        return
    entries = _read()  # re-read: another process may have added entries meanwhile
    entry = entries.pop(key, None)
    entries[key] = {**(entry if isinstance(entry, dict) else {}), **facts, "weights": label}
    _write(dict(list(entries.items())[-MAX_ENTRIES:]))
