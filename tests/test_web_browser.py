"""End to end in a real headless Chromium against `python -m web` served on localhost."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import build_test_index, make_pairs

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
PAIRS = make_pairs(30, seed=7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_spec):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    root = tmp_path_factory.mktemp("browser")
    build_test_index(root, PAIRS, tiny_model_spec)
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "web", "--index", str(root / "index"), "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/api/health", timeout=1)
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    yield url, root
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _all_images_loaded(page, selector: str) -> list[int]:
    page.wait_for_function(
        f"[...document.querySelectorAll('{selector}')].every(i => i.complete) "
        f"&& document.querySelectorAll('{selector}').length > 0")
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.naturalWidth)")


def test_search_open_more_like_this_upload_and_screenshot(server, browser, tmp_path):
    url, root = server
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(url)
    assert "30 images" in page.text_content("header")

    # text → image, typed and submitted with the keyboard
    page.fill("#q", "a green triangle")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card")
    assert page.locator("#results .card").count() == 24
    assert all(width > 0 for width in _all_images_loaded(page, "#results .card img"))
    assert "results for “a green triangle”" in page.text_content("#status")
    assert " ms" in page.text_content("#status")

    # load more: the collection has 30 images, so the second page holds 6
    page.click("#more")
    page.wait_for_function("document.querySelectorAll('#results .card').length === 30")
    assert page.is_hidden("#more")

    # open a result: large image, its captions, then "more like this"
    first_id = page.get_attribute("#results .card >> nth=0", "data-id")
    page.click("#results .card >> nth=0")
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("document.getElementById('viewer-image').naturalWidth > 0")
    assert page.locator("#viewer-captions li").count() == 3
    page.click("#viewer-similar")
    page.wait_for_function("document.getElementById('status').textContent.includes('images like')")
    page.wait_for_selector("#results .card")
    assert page.get_attribute("#results .card >> nth=0", "data-id") == first_id  # an image is most like itself

    # image query by file picker: the same photo comes back first
    photo = root / "images" / PAIRS[3][0]
    page.set_input_files("#file", str(photo))
    page.wait_for_function(f"document.getElementById('status').textContent.includes('{PAIRS[3][0]}')")
    assert page.text_content("#results .card >> nth=0").endswith(PAIRS[3][1][0])

    # image → text: captions that describe it
    page.check("input[name=target][value=captions]")
    page.set_input_files("#file", str(root / "images" / PAIRS[5][0]))
    page.wait_for_selector("#results .caption-hit")
    assert page.locator("#results.captions .caption-hit").count() == 24
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
    assert (tmp_path / "search.png").stat().st_size > 10_000
    page.close()


def test_error_empty_states_keyboard_and_phone_width(server, browser, tmp_path):
    url, root = server
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(url)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 375  # no sideways scrolling on a phone

    page.press("#q", "Enter")  # empty query
    assert "Type something" in page.text_content("#status")

    bad = tmp_path / "fake.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but truncated right here")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    assert "cannot decode" in page.text_content("#status") or "not an image" in page.text_content("#status")

    # keyboard only: search, tab to the first result, open it, close it with Escape
    page.focus("#q")
    page.keyboard.type("purple bar")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results .card")
    page.focus("#results .card >> nth=0")
    page.keyboard.press("Enter")
    page.wait_for_selector("#viewer[open]")
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    page.screenshot(path=str(tmp_path / "phone.png"))
    page.close()


def test_runs_under_gunicorn(server):
    """The README's production command: gunicorn calling the app factory with keyword settings."""
    _, root = server
    port = _free_port()
    app_spec = f'web:create_app(index="{root / "index"}")'
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "-b",
                                f"127.0.0.1:{port}", app_spec], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q=red&k=2", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"gunicorn exited: {process.stderr.read().decode()[-2000:]}")
                time.sleep(0.1)
        else:
            pytest.fail("gunicorn did not answer")
        assert b'"results"' in body
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("event", ["drop", "paste"])
def test_image_query_by_drag_and_drop_and_paste(server, browser, event):
    url, _ = server
    page = browser.new_page()
    page.goto(url)
    # a real File built in the page from an indexed image's bytes, delivered the way the browser delivers it
    page.evaluate("""async (event) => {
        const blob = await (await fetch('/image/3')).blob();
        const data = new DataTransfer();
        data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        const target = event === 'drop' ? document.getElementById('drop-zone') : document;
        const init = {bubbles: true, cancelable: true};
        target.dispatchEvent(event === 'drop' ? new DragEvent('drop', {...init, dataTransfer: data})
                                              : new ClipboardEvent('paste', {...init, clipboardData: data}));
    }""", event)
    page.wait_for_function("document.getElementById('status').textContent.includes('dropped.png')")
    assert page.get_attribute("#results .card >> nth=0", "data-id") == "3"
    page.close()
