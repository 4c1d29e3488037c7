"""The evaluation page (web/eval_pages.py): its JSON endpoints through Flask's test client, checked against a plain
Python filter of search.per_query's outcomes and against `search eval --json`; and /eval in a real Chromium against
`python -m web --index A --compare-index B`: recall table, filters, a failure opened on the search page, plots."""
import io
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from search.compare import compare
from search.per_query import KINDS, per_query
from search.query_features import GROUPS, LENGTH_KEYS, query_features
from search.store import open_index
from web import create_app

from .browser import CHROMIUM, every_image_loaded, free_port, launch_browser, wait_until, web_server
from .helpers import build_photo_index, build_test_index, make_pairs, write_images, write_karpathy

ROOT = Path(__file__).resolve().parents[1]
PAIRS = make_pairs(16, seed=3)


def search_eval_json(index: Path, cwd: Path = ROOT) -> dict:
    """`search eval --json` the way a user runs it: the oracle of the page's recall table."""
    done = subprocess.run([sys.executable, "-m", "search", "eval", "--index", str(index), "--json"], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def expected_rows(index: Path, kind: str, length: str = "", feature: str = "", fell: int = 0) -> list[tuple]:
    """Plain Python: the (query id, rank) of `kind`'s outcomes passing the filters, worst first."""
    kept = []
    for outcome in per_query(open_index(index)).of(kind):
        features = query_features(outcome.query) if kind == "text_to_image" else None
        if outcome.rank <= fell or (length and features.length != length):
            continue
        if feature and feature not in features.groups:
            continue
        kept.append((outcome.query_id, outcome.rank))
    return sorted(kept, key=lambda row: (-row[1], row[0]))


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tiny_model_spec, trained_model_dir):
    """One captioned dataset indexed by the random tiny model (A) and by the trained one (B)."""
    root = tmp_path_factory.mktemp("eval")
    a = build_test_index(root, PAIRS, tiny_model_spec, name="random")
    b = build_test_index(root, PAIRS, f"local-dir:{trained_model_dir}", name="trained")
    return a, b


@pytest.fixture(scope="module")
def client(indexes):
    return create_app(index=indexes[0]).test_client()


def rows_of(client, **params) -> list[dict]:
    """Every row for these filters, page by page."""
    rows, offset = [], 0
    while True:
        answer = client.get("/api/eval", query_string={**params, "offset": offset, "limit": 7})
        assert answer.status_code == 200, answer.get_json()
        body = answer.get_json()
        rows += body["rows"]
        offset += 7
        if offset >= body["total"]:
            assert len(rows) == body["total"]
            return rows


def test_summary_equals_search_eval_and_slices_a_plain_count(client, indexes):
    summary = client.get("/api/eval/summary").get_json()
    oracle = search_eval_json(indexes[0])
    for kind in KINDS:
        assert summary["recall"][kind] == {k: oracle[kind][k] for k in ("R@1", "R@5", "R@10")}
    assert summary["n_queries"] == {"text_to_image": oracle["n_captions"], "image_to_text": oracle["n_images"]}
    assert summary["compare"] is None and summary["plot"] == "/eval/plot/recall.png"

    outcomes = per_query(open_index(indexes[0])).of("text_to_image")
    slices = summary["slices"]
    assert slices["k"] == 5 and slices["all"] == oracle["text_to_image"]["R@5"]
    assert [g["group"] for g in slices["groups"]] == [key for key, _ in GROUPS]
    for group in slices["groups"]:
        ranks = [o.rank for o in outcomes if group["group"] in query_features(o.query).all_groups]
        assert group["n"] == len(ranks)
        assert group["recall"] == (100 * sum(r <= 5 for r in ranks) / len(ranks) if ranks else None)
    assert sum(g["n"] for g in slices["groups"] if g["group"] in LENGTH_KEYS) == len(outcomes)


@pytest.mark.parametrize("filters", [{}, {"fell": 1}, {"fell": 5}, {"fell": 10, "feature": "colours"},
                                     {"length": "words_1_5"}, {"length": "words_6_10", "fell": 1},
                                     {"feature": "counts"}, {"kind": "image_to_text", "fell": 1}])
def test_failures_are_per_query_outcomes_filtered_worst_first(client, indexes, filters):
    rows = rows_of(client, **filters)
    assert [(r["query_id"], r["rank"]) for r in rows] == expected_rows(indexes[0], filters.get("kind", "text_to_image"),
                                                                       filters.get("length", ""),
                                                                       filters.get("feature", ""),
                                                                       filters.get("fell", 0))


def test_a_failure_row_shows_gold_and_what_beat_it(client, indexes):
    outcomes = {o.query_id: o for o in per_query(open_index(indexes[0])).of("text_to_image")}
    row = rows_of(client, fell=1)[0]
    outcome = outcomes[row["query_id"]]
    assert row["query"] == outcome.query and row["score"] == outcome.score
    assert row["gold"] == [{"id": outcome.gold[0], "image": PAIRS[outcome.gold[0]][0],
                            "thumbnail": f"/thumb/{outcome.gold[0]}"}]
    assert [(b["id"], b["score"]) for b in row["beaten_by"]] == list(outcome.beaten_by)
    assert len(row["beaten_by"]) == min(row["rank"] - 1, 10)
    assert all(b["thumbnail"] == f"/thumb/{b['id']}" for b in row["beaten_by"])
    link = urllib.parse.urlsplit(row["search"])
    assert link.path == "/" and urllib.parse.parse_qs(link.query) == {"q": [outcome.query], "cutoff": ["none"]}
    thumb = client.get(row["beaten_by"][0]["thumbnail"])
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.data)).size[0] > 0

    image_row = rows_of(client, kind="image_to_text")[0]
    assert image_row["thumbnail"] == f"/thumb/{image_row['query_id']}" and "search" not in image_row
    assert all("caption" in item for item in image_row["gold"] + image_row["beaten_by"])


@pytest.mark.parametrize("query, message", [
    ("kind=sideways", "unknown kind"), ("fell=far", "fell must be an integer"), ("limit=1000", "limit must be"),
    ("offset=-1", "offset must be"), ("feature=colors", "unknown feature"),
    ("kind=image_to_text&length=words_1_5", "filter text_to_image queries only")])
def test_bad_filters_are_400_with_a_message(client, query, message):
    answer = client.get(f"/api/eval?{query}")
    assert answer.status_code == 400 and message in answer.get_json()["error"]


def test_plot_is_a_png_and_the_page_links_it(client):
    page = client.get("/eval").get_data(as_text=True)
    assert 'src="/eval/plot/recall.png"' in page and "/static/eval.js" in page
    answer = client.get("/eval/plot/recall.png")
    assert answer.status_code == 200 and answer.mimetype == "image/png"
    assert Image.open(io.BytesIO(answer.data)).size == (640, 420)
    assert client.get("/eval/plot/compare/text_to_image/recall.png").status_code == 404  # nothing compared
    assert 'id="eval-link" href="/eval"' in client.get("/").get_data(as_text=True)


def test_comparison_is_search_compare_of_the_two_indexes(indexes):
    client = create_app(index=indexes[0], compare_index=indexes[1]).test_client()
    shown = client.get("/api/eval/summary").get_json()["compare"]
    expected = compare(per_query(open_index(indexes[0])), per_query(open_index(indexes[1])),
                       labels=("random", "trained")).to_json()
    assert {k: v for k, v in shown.items() if k not in ("plots", "search")} == expected
    trained_better = next(d for d in shown["text_to_image"]["recall"] if d["k"] == 5)
    assert trained_better["ci_low"] > 0  # the trained model beats the random one, beyond doubt
    for kind in KINDS:
        for which in ("recall", "ranks"):
            answer = client.get(shown["plots"][kind][which])
            assert answer.status_code == 200 and Image.open(io.BytesIO(answer.data)).format == "PNG"
    for change in shown["text_to_image"]["improved"]:
        assert shown["search"]["text_to_image"][str(change["query_id"])].startswith("/?q=")
    assert "Comparison" in client.get("/eval").get_data(as_text=True)


def test_outcomes_are_computed_once_per_index_version(indexes, monkeypatch):
    import dataclasses

    from web import eval_pages

    app = create_app(index=indexes[0])
    calls = []
    monkeypatch.setattr(eval_pages, "per_query", lambda index: calls.append(index.version) or per_query(index))
    client = app.test_client()
    for url in ("/api/eval/summary", "/api/eval?fell=1", "/eval/plot/recall.png", "/api/eval/summary"):
        assert client.get(url).status_code == 200
    assert len(calls) == 1
    searcher = app.extensions["image_search"].searcher
    monkeypatch.setattr(searcher, "reopen", lambda: False)  # keep the swapped-in version below
    monkeypatch.setattr(searcher, "index", dataclasses.replace(searcher.index, version=("another",)))
    assert client.get("/api/eval/summary").status_code == 200 and calls[-1] == ("another",) and len(calls) == 2


def test_comparing_another_dataset_says_so(indexes, tmp_path, tiny_model_spec):
    other = build_test_index(tmp_path, make_pairs(16, seed=4), tiny_model_spec)
    shown = create_app(index=indexes[0], compare_index=other).test_client().get("/api/eval/summary").get_json()
    assert "different datasets" in shown["compare"]["error"]


def test_an_index_without_captions_gets_a_page_saying_so(tmp_path, tiny_model_spec):
    photos, index = build_photo_index(tmp_path, PAIRS[:4], tiny_model_spec)
    client = create_app(index=index).test_client()
    page = client.get("/eval")
    assert page.status_code == 200 and "has no captions" in page.get_data(as_text=True)
    assert "eval.js" not in page.get_data(as_text=True) and b'id="eval-link"' not in client.get("/").data
    answer = client.get("/api/eval/summary")
    assert answer.status_code == 400 and "no captions" in answer.get_json()["error"]
    assert client.get("/api/eval").status_code == 400
    assert client.get("/eval/plot/recall.png").status_code == 404


def test_a_missing_compare_index_is_a_one_line_error(indexes, tmp_path):
    done = subprocess.run([sys.executable, "-m", "web", "--index", str(indexes[0]), "--compare-index",
                           str(tmp_path / "nothing"), "--port", str(free_port())], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "nothing" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# -- the browser ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_spec, trained_model_dir):
    """A captioned dataset indexed by the real CLI with the trained tiny model (A) and the random one (B), from the
    data folder with relative paths, served together."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; install.sh installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    root = tmp_path_factory.mktemp("eval-site")
    pairs = make_pairs(40, seed=1)
    write_images(root / "images", pairs)
    write_karpathy(root / "k.json", pairs, ["test"] * len(pairs))
    for name, spec in (("trained", f"local-dir:{trained_model_dir}"), ("random", tiny_model_spec)):
        build = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "karpathy", "--annotations",
                                "k.json", "--images", "images", "--out", name, "--model", spec, "--quiet"],
                               cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert build.returncode == 0, build.stderr
    with web_server("trained", cwd=root, env={**os.environ, "PYTHONPATH": str(ROOT)},
                    extra=("--compare-index", "random")) as url:
        yield {"url": url, "root": root}


@pytest.mark.browser
@pytest.mark.slow
def test_eval_page_filters_opens_a_failure_and_shows_the_plots(site):
    oracle = search_eval_json(Path("trained"), cwd=site["root"])
    with launch_browser() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        failed = []
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(site["url"])
        page.click("#eval-link")
        wait_until(page, "document.querySelectorAll('#recall-table tbody td[data-k]').length === 6")
        cells = page.eval_on_selector_all("#recall-table tbody td[data-k]",
                                          "cs => cs.map(c => [c.parentNode.dataset.kind, c.dataset.k, "
                                          "Number(c.dataset.value)])")
        assert {(kind, k): value for kind, k, value in cells} == {
            (kind, k): oracle[kind][k] for kind in KINDS for k in ("R@1", "R@5", "R@10")}
        assert page.locator("#slices tbody tr").count() == len(GROUPS)
        wait_until(page, "document.querySelectorAll('#compare-table tbody tr').length === 6")
        assert page.locator("#compare-plots img").count() == 4

        # the failure list starts with "fell below rank 1", worst first
        wait_until(page, "document.querySelectorAll('#failures .failure').length > 0")
        ranks = [int(r) for r in page.eval_on_selector_all("#failures .failure", "fs => fs.map(f => f.dataset.rank)")]
        expected = expected_rows(site["root"] / "trained", "text_to_image", fell=1)
        assert ranks == [rank for _, rank in expected][:len(ranks)] and len(ranks) == min(20, len(expected))
        assert f"of {len(expected)} queries" in page.text_content("#failures-status")
        count = every_image_loaded(page)  # the recall plot, the four comparison plots, the failures' thumbnails
        assert count >= 5 + len(ranks)

        page.select_option("#fell", "5")
        page.select_option("#length", "words_6_10")
        deeper = expected_rows(site["root"] / "trained", "text_to_image", length="words_6_10", fell=5)
        wait_until(page, "(n) => document.getElementById('failures-status').textContent.includes(`of ${n} `)"
                   if deeper else "document.getElementById('failures-status').textContent.includes('No query')",
                   len(deeper) if deeper else None)
        shown = page.eval_on_selector_all("#failures .failure", "fs => fs.map(f => Number(f.dataset.queryId))")
        assert shown == [query_id for query_id, _ in deeper][:20]

        page.select_option("#length", "")
        page.select_option("#fell", "1")
        wait_until(page, "(n) => document.getElementById('failures-status').textContent.includes(`of ${n} `)",
                   len(expected))
        first = page.locator("#failures .failure").first
        caption, rank = first.locator("a.open").text_content(), int(first.get_attribute("data-rank"))
        beaten = [float(s) for s in first.locator(".item.beat figcaption").all_text_contents()]
        first.locator("a.open").click()  # the normal result view of that caption
        page.wait_for_url("**/?q=*")
        wait_until(page, "document.getElementById('status').textContent.includes('results for')")
        wait_until(page, "!document.getElementById('results').hasAttribute('aria-busy')")
        assert page.input_value("#q") == caption and not page.is_checked("#only-relevant")
        scores = [float(s) for s in page.eval_on_selector_all("#results .score", "s => s.map(e => e.textContent)")]
        # the images that beat the gold one lead the live ranking, with the scores the page showed for them
        assert scores[:len(beaten)] == pytest.approx(beaten, abs=2e-3)
        if rank <= len(scores):
            assert scores[rank - 1] <= min(beaten) + 2e-3
        every_image_loaded(page)
        page.close()
    assert not failed
