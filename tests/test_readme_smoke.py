"""The README's own commands, verbatim, from the root of a copy of the repository (as a new user runs them, with the
README's relative paths), then a real browser checks what a person sees: every picture on the page loaded."""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .browser import every_image_loaded, launch_browser, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEMO_COMMAND = "python -m web --demo --demo-scale tiny"
INDEX_COMMAND = "python -m web --index demo_data/index"
RELEVANT_COMMAND = ('python -m search query --index demo_data/index --text "two small red circles on the left" '
                    '--cutoff auto')


def readme_command(command: str) -> list[str]:
    """The command as the README prints it in a code block (a test of the README as much as of the code)."""
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S))
    assert any(line.split("#")[0].strip() == command for line in blocks.splitlines()), \
        f"README.md no longer shows `{command}` in a bash block"
    return shlex.split(command)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_repository(target: Path) -> Path:
    """The files a clone would hold (tracked and new, not ignored), without demo_data or caches."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


class Server:
    def __init__(self, argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"server-{self.port}.log"
        self.process = subprocess.Popen([sys.executable, *argv[1:], "--port", str(self.port)], cwd=cwd, env=env,
                                        stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/api/health", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None:
                    pytest.fail(f"{' '.join(argv)} exited {self.process.returncode}:\n{self.output()[-3000:]}")
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"{' '.join(argv)} did not answer within {timeout} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def browser():
    with launch_browser() as launched:
        yield launched


def _text_and_image_queries(page, url: str, photo: Path) -> None:
    failed = []
    page.on("response", lambda r: failed.append((r.url, r.status)) if r.status >= 400 else None)
    page.goto(url)
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card")
    assert every_image_loaded(page) == page.locator("#results .card").count() > 0

    page.set_input_files("#file", str(photo))
    wait_until(page, "(name) => document.getElementById('status').textContent.includes(name)", photo.name)
    page.wait_for_selector("#query-preview:not([hidden])")
    assert every_image_loaded(page) == page.locator("#results .card").count() + 1  # the query image is shown
    page.check("input[name=target][value=captions]")  # switching re-runs the image query against captions
    page.wait_for_selector("#results.captions .caption-hit")
    every_image_loaded(page)
    assert failed == [], f"requests that failed: {failed}"


def _relevant_only(repo: Path) -> None:
    """README's --cutoff auto command, verbatim from the repository root: hits with their relevance at or above the
    calibrated target, or the one line that says nothing is relevant and names the closest."""
    argv = readme_command(RELEVANT_COMMAND)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    target = json.loads((repo / "demo_data" / "index" / "manifest.json").read_text())["relevance"]["target"]
    lines = done.stdout.splitlines()
    if lines[0].startswith("nothing relevant; the closest were "):
        assert len(lines) == 1
    else:  # rank, score, relevance, image, caption
        assert all(float(line.split()[2]) >= target for line in lines), done.stdout


def test_readme_demo_and_relative_index_commands_show_every_picture(tmp_path, browser):
    repo = _copy_repository(tmp_path / "clone")
    demo = Server(readme_command(DEMO_COMMAND), cwd=repo)
    try:
        photo = next((repo / "demo_data" / "scenes").rglob("scene_test_*.jpg"))
        _text_and_image_queries(browser.new_page(), demo.url, photo)
    finally:
        demo.stop()
    assert "Traceback" not in demo.output()
    _relevant_only(repo)

    served = Server(readme_command(INDEX_COMMAND), cwd=repo)  # the relative --index, from the repository root
    try:
        _text_and_image_queries(browser.new_page(), served.url, photo)
    finally:
        served.stop()

    elsewhere = tmp_path / "elsewhere"  # and from another working directory, with a relative path from there
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(repo)}
    other = Server(["python", "-m", "web", "--index", "../clone/demo_data/index"], cwd=elsewhere, env=env)
    try:
        _text_and_image_queries(browser.new_page(), other.url, photo)
    finally:
        other.stop()
    for server in (demo, served, other):
        assert "Traceback" not in server.output() and " 500 " not in server.output()
