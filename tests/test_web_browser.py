"""End to end in a real headless Chromium against `python -m web` served on localhost."""
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .browser import CHROMIUM, free_port, launch_browser, wait_until, web_server
from .helpers import build_test_index, make_pairs

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
PAIRS = make_pairs(30, seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_spec):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    root = tmp_path_factory.mktemp("browser")
    build_test_index(root, PAIRS, tiny_model_spec)
    with web_server(root / "index") as url:
        yield url, root


@pytest.fixture(scope="module")
def browser():
    with launch_browser() as launched:
        yield launched


def _all_images_loaded(page, selector: str) -> list[int]:
    wait_until(page, 
        f"[...document.querySelectorAll('{selector}')].every(i => i.complete) "
        f"&& document.querySelectorAll('{selector}').length > 0")
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.naturalWidth)")


def test_search_open_more_like_this_upload_and_screenshot(server, browser, tmp_path):
    url, root = server
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(url)
    assert "30 images" in page.text_content("header")
    page.uncheck("#only-relevant")  # the whole ranking: with a random model's index few hits count as relevant

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
    wait_until(page, "document.querySelectorAll('#results .card').length === 30")
    assert page.is_hidden("#more")

    # open a result: large image, its captions, then "more like this"
    first_id = page.get_attribute("#results .card >> nth=0", "data-id")
    page.click("#results .card >> nth=0")
    page.wait_for_selector("#viewer[open]")
    wait_until(page, "document.getElementById('viewer-image').naturalWidth > 0")
    assert page.locator("#viewer-captions li").count() == 3
    page.click("#viewer-similar")
    wait_until(page, "document.getElementById('status').textContent.includes('images like')")
    page.wait_for_selector("#results .card")
    assert page.get_attribute("#results .card >> nth=0", "data-id") == first_id  # an image is most like itself

    # image query by file picker: the same photo comes back first
    photo = root / "images" / PAIRS[3][0]
    page.set_input_files("#file", str(photo))
    wait_until(page, f"document.getElementById('status').textContent.includes('{PAIRS[3][0]}')")
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
    port = free_port()
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
    wait_until(page, "document.getElementById('status').textContent.includes('dropped.png')")
    assert page.get_attribute("#results .card >> nth=0", "data-id") == "3"
    page.close()


def test_query_image_shown_target_switch_reruns_and_new_search_scrolls_up(server, browser):
    url, root = server
    page = browser.new_page(viewport={"width": 1200, "height": 500})
    page.goto(url)
    page.set_input_files("#file", str(root / "images" / PAIRS[4][0]))
    wait_until(page, "(name) => document.getElementById('status').textContent.includes(name)", PAIRS[4][0])
    assert page.is_visible("#query-preview") and PAIRS[4][0] in page.text_content("#query-preview")
    wait_until(page, "document.getElementById('query-image').naturalWidth > 0")  # the query image itself
    assert page.locator("#results .caption-hit").count() == 0

    page.check("input[name=target][value=captions]")  # no new upload: the image on screen is searched again
    page.wait_for_selector("#results.captions .caption-hit")
    assert PAIRS[4][0] in page.text_content("#status") and page.is_visible("#query-preview")
    page.check("input[name=target][value=images]")
    page.wait_for_selector("#results:not(.captions) .card")
    assert page.get_attribute("#results .card >> nth=0", "data-id") == "4"

    page.mouse.wheel(0, 3000)
    wait_until(page, "window.scrollY > 0")
    page.fill("#q", "a blue square")
    page.press("#q", "Enter")
    wait_until(page, "document.getElementById('status').textContent.includes('blue square')")
    assert page.evaluate("window.scrollY") == 0 and page.is_hidden("#query-preview")
    page.close()
