"""Running model calls on the process's main thread.

Torch pays OpenMP start-up on every operation issued from a thread other than the main one (measured here: a
LayerNorm 7.5 µs on the main thread, 84 µs on others; a text query 18 ms against 28 ms), so `python -m web` serves
HTTP from background threads and hands each model call to the main thread, which runs them one by one.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


class MainThreadRunner:
    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable, Future]] = queue.Queue()

    def __call__(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the main thread and return its result (or raise its exception) in the calling thread."""
        if threading.current_thread() is threading.main_thread():
            return fn()
        future: Future = Future()
        self._jobs.put((fn, future))
        return future.result()

    def run_forever(self, stop: threading.Event) -> None:
        """Serve submitted calls until `stop` is set; call from the main thread."""
        while not stop.is_set():
            try:
                fn, future = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the request thread re-raises it
                    future.set_exception(exc)
