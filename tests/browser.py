"""Shared by the browser tests: Debian's Chromium driven by Playwright, and waits that work under the page's
Content-Security-Policy (Playwright's wait_for_function evaluates strings in the page, which `script-src 'self'`
forbids; page.evaluate goes through the DevTools protocol, which the policy does not govern)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]


def launch_browser():
    """A context manager yielding a launched Chromium; skips (fails in CI) when Chromium is missing."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; install.sh installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    return _Launched(playwright_api)


class _Launched:
    def __init__(self, playwright_api):
        self._manager = playwright_api.sync_playwright()

    def __enter__(self):
        self._playwright = self._manager.__enter__()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        return self._browser

    def __exit__(self, *exc):
        self._browser.close()
        return self._manager.__exit__(*exc)


def wait_until(page, expression: str, arg=None, timeout: float = 30.0):
    """Poll a JS expression (or `(arg) => ...` function) until truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression, arg) if arg is not None else page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {expression}")
        time.sleep(0.05)


def every_image_loaded(page) -> int:
    """Wait until every visible <img> with a source has finished, then require each to have decoded
    (naturalWidth > 0): a broken picture is 'complete' too, with a width of 0. Returns how many there are."""
    visible = "[...document.images].filter(i => i.getAttribute('src') && i.offsetParent !== null)"
    # lazy images below the fold would never start loading in a still page: fetch them all now
    page.evaluate(f"{visible}.forEach(i => {{ i.loading = 'eager'; }})")
    wait_until(page, f"{visible}.every(i => i.complete)")
    widths = page.evaluate(f"{visible}.map(i => [i.currentSrc, i.naturalWidth])")
    broken = [src for src, width in widths if width == 0]
    assert widths and not broken, f"broken images: {broken}"
    return len(widths)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def web_server(index: Path | str, cwd: Path = ROOT, env: dict | None = None, extra: tuple[str, ...] = ()
               ) -> Iterator[str]:
    """`python -m web --index INDEX [EXTRA…]` on a free loopback port, started in `cwd`; yields its URL once
    /api/health answers, and stops it on exit."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "web", "--index", str(index), *extra, "--port", str(port)],
                               cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/api/health", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)
