"""Write-to-temp-then-rename: a reader, a concurrent writer or a crash sees the old file (or folder) or the complete
new one, never half of either.

`write_atomic` replaces one file; `swap_into_place` renames a finished folder over an old one; `replace_dir` writes a
folder beside its target and swaps it in. The temporary names start with `.NAME.` beside NAME: on the same
filesystem, so the rename is atomic, and hidden from folder listings.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

from .layout import OLD, beside

Content = Union[bytes, str, Callable[[Path], None]]  # bytes, UTF-8 text, or a function that writes the file it is given
TEMP_SUFFIX = ".tmp"
_NAME_TRIES = 100


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside `path`, created with the permissions a plain write would give it (umask),
    unlike mkstemp's 0600: an index or cache may be read by other users."""
    for _ in range(_NAME_TRIES):
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomic(path: Path | str, content: Content) -> None:
    """Replace (or create) the file `path` with `content`. A callable is given the temporary path to write (e.g.
    `lambda tmp: torch.save(state, tmp)`). On any failure the temporary file is removed and `path` is untouched;
    OSError propagates (callers decide whether a cache that cannot be written matters)."""
    path = Path(path)
    handle, temp = _create_beside(path)
    try:
        if callable(content):
            os.close(handle)
            content(temp)
        else:
            with os.fdopen(handle, "wb") as out:
                out.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory `tmp` to `out`, replacing what was there: `out` is never missing for more than
    the instant between two renames, and never half written."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=beside(out, OLD).name, dir=out.parent))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replace_dir(out: Path, write: Callable[[Path], None], keep: tuple[str, ...] = ()) -> None:
    """Write a new version of the folder `out` with `write(tmp)` into `.NAME.tmp` beside it (left over from an
    interrupted attempt: discarded first), carry over the entries of the old version named in `keep`, and swap it in."""
    out = Path(out)
    tmp = beside(out, TEMP_SUFFIX.lstrip("."))
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for name in keep:
        if (out / name).exists():
            (out / name).rename(tmp / name)
    swap_into_place(tmp, out)
