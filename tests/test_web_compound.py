"""The search page's compound queries (issue 13): a text plus an added image and a "without" word, "only relevant",
filters, modes, dedupe and date sort, in a real Chromium against `python -m web`; and POST /api/search through
Flask's test client. Rankings are checked against numpy brute force over the index's stored vectors."""
import base64
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.encoders import EncoderSpec, create_encoder
from search.store import open_index
from web import create_app

from .browser import CHROMIUM, every_image_loaded, launch_browser, wait_until, web_server
from .helpers import build_test_index, draw, make_pairs

ROOT = Path(__file__).resolve().parents[1]
DAY = 86400
DAY0 = 1609459200 + 12 * 3600  # 2021-01-01 noon UTC: image i was "taken" i days later (its file's mtime)
# what the trained tiny model memorised (tests/conftest.py), without anything yellow: yellow things are absent
PAIRS = [p for p in make_pairs(50, seed=1) if p[2][1] != "yellow"]
ABSENT = "a yellow circle on a grey background"
TIE = 1e-5  # scores closer than this may come in either order (float32 sums in another order)


def folder_of(i: int) -> str:
    return "trips/" if i % 2 else "home/"


def oracle_scores(vectors: np.ndarray, term_vectors: list, weights: list[float]) -> np.ndarray:
    """Brute force: the unit-normalised weighted sum of the terms' unit vectors against every stored vector."""
    query = sum(w * v / np.linalg.norm(v) for v, w in zip(term_vectors, weights))
    query = query / np.linalg.norm(query)
    return np.asarray(vectors, np.float64) @ query


def assert_ranked_like(ids: list[int], scores: np.ndarray) -> None:
    """`ids` are the best len(ids) by `scores`, in order (equal scores, within TIE, in any order)."""
    expected = np.argsort(-scores, kind="stable")[:len(ids)]
    for position, (got, want) in enumerate(zip(ids, expected)):
        assert got == want or abs(scores[got] - scores[want]) < TIE, (position, ids, expected.tolist())


def encode(encoder, text: str | None = None, image: Path | None = None) -> np.ndarray:
    if text is not None:
        return np.asarray(encoder.encode_texts([text])[0], np.float64)
    pixels = encoder.preprocess_image(Image.open(image).convert("RGB"))[None]
    return np.asarray(encoder.encode_pixels(pixels)[0], np.float64)


# -- the browser ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory, trained_model_dir):
    """Images in two folders with a date each, indexed with the trained tiny model by the real CLI from the data
    folder (relative paths), served by `python -m web`."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; install.sh installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    root = tmp_path_factory.mktemp("compound")
    rows = []
    for i, (name, captions, spec) in enumerate(PAIRS):
        path = root / "images" / (folder_of(i) + name)
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(*spec).save(path)
        os.utime(path, (DAY0 + i * DAY, DAY0 + i * DAY))
        rows += [(folder_of(i) + name, caption) for caption in captions]
    with (root / "captions.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("filepath", "caption"), *rows])
    spec = f"local-dir:{trained_model_dir}"
    build = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "csv", "--annotations",
                            "captions.csv", "--images", "images", "--out", "index", "--model", spec, "--quiet"],
                           cwd=root, capture_output=True, text=True, check=False,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert build.returncode == 0, build.stderr
    with web_server(root / "index") as url:
        yield from _site(url, root, spec)


def _site(url: str, root: Path, spec: str):
    index = open_index(root / "index")
    paths = {i: r.path for i, r in index.catalog.images(list(range(index.manifest.n_images))).items()}
    encoder = create_encoder(EncoderSpec.from_args(spec, None), "torch")
    yield {"url": url, "root": root, "index": index, "paths": paths, "encoder": encoder,
           "vectors": np.load(root / "index" / "image_vectors.npy")}


@pytest.fixture(scope="module")
def browser(site):
    with launch_browser() as launched:
        yield launched


def open_page(site, browser):
    """The page, recording the JSON of each POST /api/search it sends."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.method == "POST" and r.url.endswith("/api/search") else None)
    page.goto(site["url"])
    return page, sent


def settle(page) -> None:
    wait_until(page, "!document.getElementById('results').hasAttribute('aria-busy')")


def shown_ids(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")]


def status(page) -> str:
    return page.text_content("#status")


@pytest.mark.browser
@pytest.mark.slow
def test_text_plus_image_without_word_ranks_like_numpy(site, browser):
    page, sent = open_page(site, browser)
    assert page.is_checked("#only-relevant")  # the index is calibrated: "only relevant" starts on
    page.uncheck("#only-relevant")  # a whole page, to compare with the brute-force ranking
    photo = site["root"] / "images" / (folder_of(3) + PAIRS[3][0])
    page.fill("#q", "a red circle")
    page.click("#add-image")  # the button opens the hidden file picker
    page.set_input_files("#term-file", str(photo))
    page.wait_for_selector("#terms .chip.image img")
    page.fill("#without", "grey")
    page.press("#without", "Enter")
    assert page.text_content("#terms .chip.without").startswith("without “grey”")
    assert page.input_value("#without") == ""
    page.click("#text-form button[type=submit]")
    wait_until(page, "document.getElementById('status').textContent.includes('results for')")
    settle(page)

    assert f"“a red circle” + {PAIRS[3][0]} without “grey”" in status(page)
    assert page.locator("#terms .chip").count() == 2 and PAIRS[3][0] in page.text_content("#terms .chip.image")
    assert every_image_loaded(page) == 24 + 1  # the results and the chip's thumbnail
    assert sent[-1]["terms"][0] == {"text": "a red circle", "weight": 1}
    assert sent[-1]["terms"][2] == {"text": "grey", "weight": -0.5} and sent[-1]["cutoff"] == "none"
    assert base64.b64decode(sent[-1]["terms"][1]["image"]) == photo.read_bytes()

    encoder, vectors = site["encoder"], site["vectors"]
    terms = [encode(encoder, text="a red circle"), encode(encoder, image=photo), encode(encoder, text="grey")]
    scores = oracle_scores(vectors, terms, [1, 1, -0.5])
    without_minus = oracle_scores(vectors, terms[:2], [1, 1])
    assert np.argsort(-scores)[:24].tolist() != np.argsort(-without_minus)[:24].tolist()  # the minus term matters
    ids = shown_ids(page)
    assert_ranked_like(ids, scores)
    shown_scores = [float(s) for s in page.eval_on_selector_all("#results .score", "s => s.map(e => e.textContent)")]
    assert shown_scores == pytest.approx(scores[ids].tolist(), abs=2e-3)
    assert page.locator("#results .relevance").count() == 24  # "NN % relevant" beside each score

    page.click("#more")  # the next page, by offset
    wait_until(page, "(n) => document.querySelectorAll('#results .card').length === n", len(PAIRS))
    assert sent[-1]["offset"] == 24 and page.is_hidden("#more")
    assert_ranked_like(shown_ids(page), scores)

    page.click("#terms .chip.without .remove")  # chips are removable; the next search goes without it
    assert page.locator("#terms .chip").count() == 1
    page.click("#text-form button[type=submit]")
    settle(page)
    assert [t.get("weight") for t in sent[-1]["terms"]] == [1, 1]
    assert_ranked_like(shown_ids(page), without_minus)
    page.close()


@pytest.mark.browser
@pytest.mark.slow
def test_only_relevant_says_nothing_relevant_for_an_absent_thing(site, browser):
    page, sent = open_page(site, browser)
    page.fill("#q", ABSENT)
    page.press("#q", "Enter")
    wait_until(page, "document.getElementById('status').textContent.includes('nothing relevant')")
    settle(page)
    assert sent[-1]["cutoff"] == "auto" and "the closest were" in status(page)
    closest = page.locator("#results .card.not-relevant")
    assert closest.count() > 0 and closest.count() == page.locator("#results .card").count()
    assert all(t.startswith("not relevant") for t in closest.all_text_contents())  # each marked visibly
    every_image_loaded(page)
    assert page.is_hidden("#more")

    page.uncheck("#only-relevant")  # the switch re-runs the query with cutoff none: the whole ranking
    settle(page)
    assert sent[-1]["cutoff"] == "none" and page.locator("#results .card").count() == 24
    assert page.locator("#results .not-relevant").count() == 0
    page.close()


@pytest.mark.browser
@pytest.mark.slow
def test_filters_sort_modes_and_dedupe_rerun_the_query(site, browser):
    page, sent = open_page(site, browser)
    paths, vectors = site["paths"], site["vectors"]
    taken = {i: DAY0 + PAIRS.index(next(p for p in PAIRS if paths[i].endswith("/" + p[0]))) * DAY for i in paths}
    page.uncheck("#only-relevant")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    settle(page)

    page.click("#filters summary")
    page.fill("#f-path", "trips/")
    page.press("#f-path", "Tab")  # a committed change re-runs the query
    settle(page)
    assert sent[-1]["filters"] == {"path_prefix": "trips/"}
    trips = [i for i in paths if paths[i].startswith("trips/")]
    assert sorted(shown_ids(page)) == sorted(trips)  # fewer than a page: all of them

    page.select_option("#sort", "date")
    settle(page)
    assert sent[-1]["sort"] == "date"
    assert shown_ids(page) == sorted(trips, key=lambda i: -taken[i])  # newest first

    after, before = time.gmtime(DAY0 + 10 * DAY), time.gmtime(DAY0 + 20 * DAY)
    page.fill("#f-after", time.strftime("%Y-%m-%d", after))
    page.fill("#f-before", time.strftime("%Y-%m-%d", before))
    page.dispatch_event("#f-before", "change")
    settle(page)
    assert sent[-1]["filters"] == {"path_prefix": "trips/", "taken_after": time.strftime("%Y-%m-%d", after),
                                   "taken_before": time.strftime("%Y-%m-%d", before)}
    window = [i for i in trips if DAY0 + 10 * DAY <= taken[i] <= DAY0 + 20 * DAY]
    assert window and shown_ids(page) == sorted(window, key=lambda i: -taken[i])  # both days included

    page.fill("#f-min-width", "100")  # every image is 48 px wide
    page.press("#f-min-width", "Tab")
    settle(page)
    assert sent[-1]["filters"]["min_width"] == 100 and "No results" in status(page)
    for field in ("#f-min-width", "#f-after", "#f-before", "#f-path"):
        page.fill(field, "")
        page.dispatch_event(field, "change")
    page.select_option("#sort", "relevance")
    settle(page)

    # keyword mode: badges say what matched, the query's words are marked inside the caption
    page.select_option("#mode", "keyword")
    settle(page)
    assert sent[-1]["mode"] == "keyword" and page.locator("#results .card").count() > 0
    for text in page.locator("#results .card .text").all_text_contents():
        assert "caption" in text and "% relevant" not in text
    marks = {m.lower() for m in page.locator("#results .card mark").all_text_contents()}
    assert marks and marks <= {"red", "circle"}
    assert page.locator("#results .card .line:has(mark)").count() == page.locator("#results .card").count()
    page.fill("#q", "img_009")  # a file name: matched as "file name", marked in the file line
    page.press("#q", "Enter")
    settle(page)
    assert page.locator("#results .badge.matched-file-name").count() >= 1
    assert "009" in page.locator("#results .card .file mark").all_text_contents()

    page.select_option("#mode", "hybrid")
    settle(page)
    assert sent[-1]["mode"] == "hybrid" and page.locator("#results .badge.matched-vector").count() > 0

    # hide near-duplicates: greedy collapse of the vector ranking at the index's calibrated threshold
    page.select_option("#mode", "vector")
    page.fill("#q", "a red circle")
    page.check("#dedupe")
    page.press("#q", "Enter")
    settle(page)
    assert sent[-1]["dedupe"] is True
    threshold = site["index"].manifest.near_duplicates["near"]["threshold"]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = oracle_scores(vectors, [encode(site["encoder"], text="a red circle")], [1])
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if all(unit[i] @ unit[j] < threshold for j in kept):
            kept.append(int(i))
    assert shown_ids(page) == kept[:24]
    every_image_loaded(page)
    page.close()


def test_only_relevant_starts_on_only_for_a_calibrated_index(tmp_path, tiny_model_spec, monkeypatch):
    app = create_app(index=build_test_index(tmp_path, make_pairs(10, seed=3), tiny_model_spec))
    searcher = app.extensions["image_search"].searcher
    assert "text_image" in searcher.index.manifest.relevance["maps"]
    assert b'id="only-relevant" type="checkbox" checked' in app.test_client().get("/").data
    uncalibrated = dataclasses.replace(searcher.index.manifest, relevance={})
    monkeypatch.setattr(searcher, "index", dataclasses.replace(searcher.index, manifest=uncalibrated))
    page = app.test_client().get("/").data
    assert b'id="only-relevant" type="checkbox">' in page and b"largest score gap" in page

