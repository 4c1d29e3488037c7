"""One writer at a time: an exclusive, non-blocking `flock` on a lock file beside the target (`PARENT/.NAME.lock`).

A second writer is refused at once with WriterBusyError naming the holder (pid, command line and start time, which
the holder writes into the lock file). The kernel drops a flock when its holder dies, even by kill -9, so a lock left
behind is free again. The lock file itself is never deleted: deleting a flock'd file lets the next two writers lock
two different files.

Re-entrant within one thread: the CLI takes the lock before loading a model, then the IndexWriter it creates takes
it again. A second flock on a new descriptor of the same file would refuse this very process, so a registry keyed by
(lock file, thread) counts the nesting instead. Another thread of the same process is refused like another process.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from search.errors import EngineError, WriterBusyError
from search.layout import lock_file

# A refused writer may read the lock file between the holder's flock and its write of the details: re-read briefly.
HOLDER_READ_TRIES = 20
HOLDER_READ_PAUSE_S = 0.01
MAX_COMMAND_CHARS = 200  # the refusal stays one readable line

_held: dict[tuple[str, int], list[int]] = {}  # (lock file, thread id) -> [descriptor, nesting depth]
_guard = threading.Lock()


def lock_path(target: Path | str) -> Path:
    """`PARENT/.NAME.lock` for the target `PARENT/NAME` (an index, a model folder, the demo folder)."""
    return lock_file(os.path.abspath(target))


def _command_line() -> str:
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = os.path.basename(argv[0])
    command = shlex.join(argv).replace("\n", " ")
    return command if len(command) <= MAX_COMMAND_CHARS else command[:MAX_COMMAND_CHARS - 1] + "…"


def _since(started: str) -> str:
    moment = datetime.fromisoformat(started)
    return moment.strftime("%H:%M:%S" if moment.date() == datetime.now().date() else "%Y-%m-%d %H:%M:%S")


class WriterLock:
    """`with WriterLock(target): ...` holds the writer lock on `target` for the block; `acquire()` raises
    WriterBusyError at once when another process (or thread) holds it. Creates the target's parent folder."""

    def __init__(self, target: Path | str):
        self.target = Path(target)
        self.path = lock_path(target)
        self._key: tuple[str, int] | None = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "WriterLock":
        if self._key is not None:
            raise RuntimeError(f"{self.path} is already held by this lock object")
        key = (str(self.path), threading.get_ident())
        with _guard:
            if key in _held:  # this thread holds it already (the CLI, around an IndexWriter)
                _held[key][1] += 1
                self._key = key
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise EngineError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterBusyError(self._refusal()) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "command": _command_line(),
                  "started": datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        with _guard:
            _held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1]:
                return
            del _held[key]
        fd = entry[0]
        os.ftruncate(fd, 0)  # no stale details for a refusal that reads between our unlock and the next writer's
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _refusal(self) -> str:
        holder = None
        for _ in range(HOLDER_READ_TRIES):
            try:
                holder = json.loads(self.path.read_text(encoding="utf-8"))
                break
            except (OSError, ValueError):
                time.sleep(HOLDER_READ_PAUSE_S)
        who = "another process"
        if isinstance(holder, dict) and {"pid", "command", "started"} <= holder.keys():
            if holder["pid"] == os.getpid():
                who = "another thread of this process"
            else:
                who += f" (pid {holder['pid']}: {holder['command']}, since {_since(holder['started'])})"
        return f"{self.target} is being written by {who}; wait for it or stop it"


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of held lock descriptors: the parent keeps the lock,
    and the parent's death frees it even while the child lingers. No LOCK_UN here: that would unlock the parent."""
    global _guard
    _guard = threading.Lock()  # another thread of the parent may have held it at the fork
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)
