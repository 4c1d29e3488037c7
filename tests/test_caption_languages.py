"""Captions in two languages (English and Chinese): recall per language in `search eval` and on /eval, Chinese
queries through the API and the page."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from search.encoders import EncoderSpec, create_encoder
from search.store import open_index
from web import create_app
from web.config import WebConfig

from .browser import every_image_loaded, launch_browser, web_server
from .helpers import build_test_index, make_pairs

ROOT = Path(__file__).resolve().parents[1]
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
      "white": "白色", "black": "黑色", "circle": "圆", "square": "方块", "triangle": "三角形", "bar": "条",
      "grey": "灰色", "pale": "浅色", "dark": "深色"}
ENGLISH_ONLY = 3  # the last images have no Chinese caption: image→text in Chinese leaves them out


def _pairs():
    pairs = make_pairs(24, seed=9)
    mixed = []
    for i, (name, captions, (shape, colour, bg)) in enumerate(pairs):
        chinese = (f"{ZH[bg]}背景上的{ZH[colour]}{ZH[shape]}", f"一个{ZH[colour]}的{ZH[shape]}")
        mixed.append((name, captions + (chinese if i < len(pairs) - ENGLISH_ONLY else ()), (shape, colour, bg)))
    return mixed


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, trained_model_dir):
    return build_test_index(tmp_path_factory.mktemp("languages"), _pairs(), f"local-dir:{trained_model_dir}")


def _strict_recall(scores: np.ndarray, own: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Plain numpy: rank = 1 + wrong candidates scoring at least the best correct one; queries without a correct
    candidate are left out."""
    keep = own.any(axis=1)
    scores, own = scores[keep], own[keep]
    best = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)
    ranks = 1 + ((scores >= best) & ~own).sum(axis=1)
    return {f"R@{k}": 100 * float(np.mean(ranks <= k)) for k in ks}


def _brute_force(index_dir) -> dict:
    """Per language: text→image over its captions, image→text among its captions alone."""
    index = open_index(index_dir)
    images, captions = index.vectors("images").astype(np.float64), index.vectors("captions").astype(np.float64)
    owners = np.asarray(index.catalog.caption_image_ids())
    texts = [index.catalog.captions([i])[i].text for i in range(len(owners))]
    expected = {}
    for language, chinese in (("en", False), ("zh", True)):
        chosen = np.asarray([any("\u4e00" <= ch <= "\u9fff" for ch in t) == chinese for t in texts])
        scores = captions[chosen] @ images.T
        own = owners[chosen][:, None] == np.arange(len(images))[None, :]
        expected[language] = {"n_captions": int(chosen.sum()), "text_to_image": _strict_recall(scores, own),
                              "image_to_text": _strict_recall(scores.T, own.T)}
    return expected


def test_search_eval_reports_recall_per_language_equal_to_brute_force(index_dir):
    done = subprocess.run([sys.executable, "-m", "search", "eval", "--index", index_dir.name, "--json", "--ties",
                           "strict"], cwd=index_dir.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    languages = json.loads(done.stdout)["languages"]
    expected = _brute_force(index_dir)
    assert expected["zh"]["n_captions"] == 2 * (24 - ENGLISH_ONLY) and expected["en"]["n_captions"] == 3 * 24
    assert list(languages) == ["en", "zh"]
    for language, numbers in expected.items():
        assert languages[language]["n_captions"] == numbers["n_captions"]
        for kind in ("text_to_image", "image_to_text"):
            got = {k: languages[language][kind][k] for k in ("R@1", "R@5", "R@10")}
            assert got == pytest.approx(numbers[kind], abs=1e-9), (language, kind)
    assert expected["en"]["text_to_image"]["R@1"] > 10  # a trained model: the comparison is not of zeros
    table = subprocess.run([sys.executable, "-m", "search", "eval", "--index", index_dir.name],
                           cwd=index_dir.parent, capture_output=True, text=True).stdout
    assert "English captions only (72;" in table and f"Chinese captions only ({2 * (24 - ENGLISH_ONLY)};" in table


def test_one_language_reports_no_per_language_recall(tmp_path, tiny_model_spec):
    index = build_test_index(tmp_path, make_pairs(8, seed=2), tiny_model_spec)
    done = subprocess.run([sys.executable, "-m", "search", "eval", "--index", str(index), "--json"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "languages" not in json.loads(done.stdout)
    client = create_app(WebConfig(index=index)).test_client()
    groups = [g["group"] for g in client.get("/api/eval/summary").get_json()["slices"]["groups"]]
    assert not any(g.startswith("language_") for g in groups)


def test_eval_page_slices_per_language(index_dir):
    client = create_app(WebConfig(index=index_dir)).test_client()
    slices = client.get("/api/eval/summary").get_json()["slices"]
    by_group = {g["group"]: g for g in slices["groups"]}
    expected = _brute_force(index_dir)
    for language in ("en", "zh"):
        group = by_group[f"language_{language}"]
        assert group["n"] == expected[language]["n_captions"]
        assert group["recall"] == pytest.approx(expected[language]["text_to_image"]["R@5"], abs=1e-9)
    assert by_group["language_zh"]["label"] == "Chinese captions"


def test_failures_filter_by_language(index_dir):
    """`language=` keeps the captions of that language (told by their script here, independently of the server's
    rule), worst first; it describes captions, so other directions refuse it, as do unknown codes."""
    client = create_app(WebConfig(index=index_dir)).test_client()
    def rows(query: str) -> list[dict]:  # every page of it
        found, offset = [], 0
        while True:
            body = client.get(f"/api/eval?fell=0&limit=100&offset={offset}{query}").get_json()
            found += body["rows"]
            offset += 100
            if offset >= body["total"]:
                return found

    every = rows("")
    assert len(every) == 24 * 3 + (24 - ENGLISH_ONLY) * 2
    for language, chinese in (("en", False), ("zh", True)):
        expected = [row for row in every if any("\u4e00" <= ch <= "\u9fff" for ch in row["query"]) == chinese]
        assert rows(f"&language={language}") == expected and expected
    assert client.get("/api/eval?kind=image_to_text&language=zh").status_code == 400
    assert client.get("/api/eval?language=fr").status_code == 400


def test_chinese_queries_through_the_api(index_dir, trained_model_dir):
    """UTF-8 in the GET query string and in a JSON body; the ranking is the model's for that text."""
    query = "一个红色的圆"
    client = create_app(WebConfig(index=index_dir)).test_client()
    index = open_index(index_dir)
    encoder = create_encoder(EncoderSpec.from_args(f"local-dir:{trained_model_dir}", None), "torch")
    scores = index.vectors("images").astype(np.float64) @ encoder.encode_texts([query])[0].astype(np.float64)
    expected = list(np.argsort(-scores, kind="stable")[:5])
    answers = [
        client.get(f"/api/search?q={urllib.parse.quote(query)}&k=5&cutoff=none"),
        client.post("/api/search", data=json.dumps({"terms": [{"text": query}], "k": 5, "cutoff": "none"},
                                                   ensure_ascii=False).encode("utf-8"),
                    content_type="application/json; charset=utf-8"),
        client.post("/api/search", json={"terms": [{"text": query}], "k": 5, "cutoff": "none"}),  # \\u escapes
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.get_data(as_text=True)
        body = answer.get_json()
        assert query in json.dumps(body["query"], ensure_ascii=False)
        assert [hit["id"] for hit in body["results"]] == expected
        assert [hit["score"] for hit in body["results"]] == pytest.approx(list(scores[expected]), abs=1e-4)


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_takes_a_chinese_query_on_the_tiny_demo(tmp_path):
    from demo import SCALES
    from demo.prepare import prepare_demo

    root = tmp_path / "demo"
    prepare_demo(root, SCALES["tiny"])
    query = "两个红色的小圆在左边"
    with launch_browser() as browser, web_server(root / "index") as url:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        failed = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(url)
        page.uncheck("#only-relevant")  # the tiny demo's model is barely trained: show the whole ranking
        page.fill("#q", query)
        page.press("#q", "Enter")
        page.wait_for_selector("#results .card")
        assert page.locator("#results .card").count() > 0
        assert every_image_loaded(page) >= page.locator("#results .card").count()
        assert f"“{query}”" in page.text_content("#status")

        page.goto(f"{url}/eval")  # the failures, filtered to the Chinese captions
        page.wait_for_selector("#failures .failure")
        assert page.is_visible("#language")
        page.select_option("#fell", "0")
        page.select_option("#language", "zh")
        page.wait_for_selector("#failures-status:has-text('of 320 queries')")  # 64 test images × 5 Chinese captions
        heads = page.locator("#failures .failure a.open").all_text_contents()
        assert heads and all(any("\u4e00" <= ch <= "\u9fff" for ch in text) for text in heads)
        assert every_image_loaded(page) > 0
        assert not failed
