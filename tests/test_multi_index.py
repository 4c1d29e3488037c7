"""Many indexes in one server (`python -m web --index a=PATH --index b=PATH`): two indexes built with different tiny
models, served at once by the real CLI; the API, clip-retrieval's ClipClient and the page switch between them, each
index follows its own updates, and indexes built with the same model share one model load."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

import web.__main__ as web_main
import web.engine
from indexer.cli import main as indexer_main
from search.errors import ModelMismatchError
from search.openclip.local_dir import init_local_dir
from web import create_app
from web.config import read_indices_paths

from .browser import every_image_loaded, launch_browser, wait_until, web_server
from .helpers import TINY_MODEL_CFG, build_test_index, draw, make_pairs, write_images
from .test_clip_retrieval_api import clip_client_module

PAIRS_A = make_pairs(12, seed=21)
PAIRS_B = make_pairs(20, seed=22)
QUERY = "a red circle"


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Another tiny model: 24-d embeddings (the tiny model's are 32-d), other random weights."""
    return init_local_dir({**TINY_MODEL_CFG, "embed_dim": 24}, tmp_path_factory.mktemp("other_model"), seed=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_spec, other_model_dir):
    """a/photos (12 images, the tiny model) and b/photos (20 images, the other model)."""
    root = tmp_path_factory.mktemp("multi")
    build_test_index(root / "a", PAIRS_A, tiny_model_spec, name="photos")
    build_test_index(root / "b", PAIRS_B, f"local-dir:{other_model_dir}", name="photos")
    return root


@pytest.fixture(scope="module")
def server(work):
    """As the README says: relative paths, from the folder holding the indexes."""
    with web_server("a=a/photos", cwd=work, extra=("--index", "b=b/photos")) as url:
        yield url


def cli_query(work: Path, name: str, text: str, k: int) -> list[dict]:
    """The oracle: `python -m search query --json` on one index, in its own process."""
    done = subprocess.run([sys.executable, "-m", "search", "query", "--index", f"{name}/photos", "--text", text,
                           "-k", str(k), "--json"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["results"]


def api_search(url: str, name: str, text: str, k: int) -> list[dict]:
    answer = requests.get(f"{url}/api/search", params={"q": text, "k": k, "cutoff": "none", "index": name},
                          timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def test_the_api_answers_each_index_as_the_cli_does(server, work):
    for name, pairs in (("a", PAIRS_A), ("b", PAIRS_B)):
        results = api_search(server, name, QUERY, 8)
        expected = cli_query(work, name, QUERY, 8)
        assert [r["image"] for r in results] == [e["image"] for e in expected]
        assert [r["captions"] for r in results] == [e["captions"] for e in expected]
        assert [r["score"] for r in results] == pytest.approx([e["score"] for e in expected], abs=1e-5)
        # the page's URLs carry the index: the thumbnail and the original are this index's pictures
        first = results[0]
        assert first["thumbnail"] == f"/thumb/{first['id']}?index={name}"
        thumb = requests.get(server + first["thumbnail"], timeout=30)
        assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"
        info = requests.get(f"{server}/api/images/{first['id']}", params={"index": name}, timeout=30).json()
        assert info["image"] == first["image"] and info["captions"] == list(pairs[first["id"]][1])
        original = requests.get(server + info["url"], timeout=30).content
        assert original == (work / name / "images" / first["image"]).read_bytes()
    # the same id is another picture in each index, and each URL gets its own
    assert (work / "a" / "images" / PAIRS_A[0][0]).read_bytes() != (work / "b" / "images" / PAIRS_B[0][0]).read_bytes()
    for name in ("a", "b"):
        served = requests.get(f"{server}/image/0", params={"index": name}, timeout=30).content
        assert served == (work / name / "images" / "img_000.png").read_bytes()
    # no index named: the default (the first); JSON bodies name it too
    default = api_search(server, None, QUERY, 8)
    assert [r["image"] for r in default] == [r["image"] for r in cli_query(work, "a", QUERY, 8)]
    body = requests.post(f"{server}/api/search", json={"terms": [{"text": QUERY}], "k": 8, "index": "b"},
                         timeout=60).json()
    assert [r["image"] for r in body["results"]] == [e["image"] for e in cli_query(work, "b", QUERY, 8)]


def test_indexes_stats_health_and_unknown_names(server, other_model_dir, tiny_model_dir):
    listed = requests.get(f"{server}/api/indexes", timeout=30).json()
    assert [(i["name"], i["images"], i["captions"], i["default"]) for i in listed] == [
        ("a", 12, 36, True), ("b", 20, 60, False)]
    assert str(tiny_model_dir) in listed[0]["model"] and str(other_model_dir) in listed[1]["model"]
    for name, n in (("a", 12), ("b", 20)):
        assert requests.get(f"{server}/api/stats", params={"index": name}, timeout=30).json()["images"] == n
        assert requests.get(f"{server}/api/health", params={"index": name}, timeout=30).json()["images"] == n
        summary = requests.get(f"{server}/api/eval/summary", params={"index": name}, timeout=60).json()
        assert summary["index"] == name and summary["n_queries"]["image_to_text"] == n
    for path in ("/api/search?q=red", "/api/stats", "/api/images/0"):
        answer = requests.get(f"{server}{path}", params={"index": "zzz"}, timeout=30)
        assert answer.status_code == 404 and answer.json() == {"error": "no index named zzz (have: a, b)"}
    answer = requests.post(f"{server}/api/search", json={"terms": [{"text": "red"}], "index": "zzz"}, timeout=30)
    assert answer.status_code == 404 and "no index named zzz" in answer.json()["error"]
    # the pages of index b link to b's pages, images and thumbnails
    page = requests.get(f"{server}/eval", params={"index": "b"}, timeout=60).text
    assert "20 images" in page and 'href="/?index=b"' in page
    duplicates = requests.get(f"{server}/duplicates", params={"index": "b", "tier": "near"}, timeout=60).text
    assert "20 images" in duplicates and "/duplicates?tier=exact&amp;index=b" in duplicates


def test_clip_client_asks_each_index_by_indice_name(server, work):
    clip = clip_client_module()
    assert requests.get(f"{server}/indices-list", timeout=30).json() == ["a", "b"]
    for name, pairs in (("a", PAIRS_A), ("b", PAIRS_B)):
        cc = clip.ClipClient(url=f"{server}/knn-service", indice_name=name, num_images=6, deduplicate=False)
        results = cc.query(text=QUERY)
        expected = cli_query(work, name, QUERY, 6)
        assert [r["image_path"] for r in results] == [e["image"] for e in expected]
        assert [r["similarity"] for r in results] == pytest.approx([e["score"] for e in expected], abs=1e-5)
        assert requests.get(results[0]["url"], timeout=30).content == (work / name / "images" /
                                                                       results[0]["image_path"]).read_bytes()
        metadata = requests.post(f"{server}/metadata", json={"indice_name": name, "ids": [3]}, timeout=30).json()
        assert metadata[0]["metadata"]["captions"] == list(pairs[3][1])
    answer = requests.post(f"{server}/knn-service", json={"text": "red", "indice_name": "laion5B"}, timeout=30)
    assert answer.status_code == 400 and "unknown indice_name 'laion5B'" in answer.json()["error"]


def test_same_model_loads_once_and_must_match_its_fingerprint(work, tmp_path, monkeypatch, tiny_model_spec):
    built = []
    real = web.engine.create_encoder

    def counting(spec, *args, **kwargs):
        built.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(web.engine, "create_encoder", counting)
    third = build_test_index(tmp_path / "c", make_pairs(9, seed=23), tiny_model_spec, name="photos")
    app = create_app(indexes={"a": work / "a" / "photos", "b": work / "b" / "photos", "c": third})
    assert len(built) == 2 and built[0] != built[1]  # a and c: one model; b: another
    state = app.extensions["image_search"]
    assert state.indexes["a"].searcher.encoder is state.indexes["c"].searcher.encoder
    assert state.indexes["b"].searcher.encoder is not state.indexes["a"].searcher.encoder
    client = app.test_client()
    for name, index in (("a", work / "a" / "photos"), ("c", third)):
        answer = client.get(f"/api/search?q={QUERY}&k=5&cutoff=none&index={name}").get_json()["results"]
        assert [r["image"] for r in answer] == [e["image"] for e in cli_query(index.parent.parent, index.parent.name,
                                                                              QUERY, 5)]
    # an index naming the same model but recording other weights is refused at start, as Searcher.open refuses it
    changed = shutil.copytree(third, tmp_path / "changed")
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * len(manifest["fingerprint"])
    (changed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="weights"):
        create_app(indexes={"a": work / "a" / "photos", "changed": changed}, runtime="torch")


def test_each_index_follows_its_own_updates(tmp_path, tiny_model_spec, other_model_dir, monkeypatch):
    monkeypatch.setattr(web.engine, "RELOAD_CHECK_SECONDS", 0.0)  # look on every request: no waiting in the test
    pairs = make_pairs(14, seed=24)
    photos = {"a": write_images(tmp_path / "a_photos", pairs[:6]),
              "b": write_images(tmp_path / "b_photos", pairs[6:10])}
    for name, model in (("a", tiny_model_spec), ("b", f"local-dir:{other_model_dir}")):
        assert indexer_main(["build", "--format", "folder", "--images", str(photos[name]), "--out",
                             str(tmp_path / name), "--model", model, "--quiet"]) == 0
    app = create_app(indexes={"a": tmp_path / "a", "b": tmp_path / "b"}, runtime="torch")
    client = app.test_client()
    state = app.extensions["image_search"]
    version_a = state.indexes["a"].searcher.index.version
    assert client.get("/api/health?index=b").get_json()["images"] == 4

    for name, _, attrs in pairs[10:]:
        draw(*attrs).save(photos["b"] / f"added_{name}")
    assert indexer_main(["update", "--index", str(tmp_path / "b"), "--quiet"]) == 0
    assert client.get("/api/health?index=a").get_json()["images"] == 6
    assert state.indexes["b"].searcher.index.manifest.n_images == 4  # only the index a request uses is looked at
    assert client.get("/api/health?index=b").get_json()["images"] == 8
    assert len(client.get("/api/search?q=shape&k=20&index=b").get_json()["results"]) == 8
    assert client.get("/api/health?index=a").get_json()["images"] == 6
    assert state.indexes["a"].searcher.index.version == version_a
    listed = {i["name"]: i["images"] for i in client.get("/api/indexes").get_json()}
    assert listed == {"a": 6, "b": 8}
    assert client.post("/api/reload?index=b").get_json() == {"reloaded": False, "images": 8, "captions": 0}


def test_indices_paths_file_and_bad_starts(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)  # clip-back takes relative paths from the current directory; so do we
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"b": "b/photos", "a": "a/photos"}))
    clip_shape = tmp_path / "clip.json"
    clip_shape.write_text(json.dumps({"b": {"indice_folder": "b/photos", "clip_model": "ViT-B/32"},
                                      "a": {"indice_folder": str(work / "a" / "photos")}}))
    assert read_indices_paths(plain) == (("b", Path("b/photos")), ("a", Path("a/photos")))
    assert read_indices_paths(clip_shape) == (("b", Path("b/photos")), ("a", work / "a" / "photos"))
    client = create_app(indexes=read_indices_paths(clip_shape), runtime="torch").test_client()
    assert client.get("/indices-list").get_json() == ["b", "a"]
    assert client.get("/api/health").get_json()["images"] == 20  # the file's first is the default

    assert web_main.named_index("a=x/y") == ("a", Path("x/y"))
    assert web_main.named_index("b/photos") == ("photos", Path("b/photos"))
    for argv, message in (
            (["--index", "a/photos", "--index", "b/photos"], "two indexes are named 'photos'"),
            (["--index", "a=a/photos", "--index", "b=nowhere"], "nowhere: no such index directory"),
            (["--index", "a=a/photos", "--indices-paths", str(tmp_path / "missing.json")], "unreadable indices file"),
            (["--indices-paths", str(_written(tmp_path / "list.json", ["a/photos"]))], "expected a JSON object"),
            (["--indices-paths", str(_written(tmp_path / "num.json", {"a": 3}))], "must be a path")):
        assert web_main.main([*argv, "--port", "0"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def _written(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.browser
def test_the_page_switches_index_with_the_picker(server, work):
    with launch_browser() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(server)
        assert page.is_visible("#index-picker") and page.input_value("#index-picker") == "a"
        assert "12 images" in page.text_content("header")
        page.uncheck("#only-relevant")  # the whole ranking, as the API answers with cutoff=none
        page.fill("#q", QUERY)
        page.press("#q", "Enter")
        wait_until(page, "document.querySelectorAll('#results .card').length === 12")
        assert every_image_loaded(page) >= 12

        page.select_option("#index-picker", "b")  # the same query, on b, in the URL
        page.wait_for_url(lambda address: "index=b" in address)
        wait_until(page, "document.querySelectorAll('#results .card').length === 20")
        assert "20 images" in page.text_content("header") and page.input_value("#q") == QUERY
        shown = page.eval_on_selector_all("#results .card", "cards => cards.map(c => Number(c.dataset.id))")
        assert shown == [r["id"] for r in api_search(server, "b", QUERY, 20)]
        assert every_image_loaded(page) >= 20
        assert all("index=b" in src for src in page.eval_on_selector_all("#results img", "i => i.map(x => x.src)"))

        page.click("#results .card >> nth=0")  # the viewer shows b's picture and captions
        page.wait_for_selector("#viewer[open]")
        wait_until(page, "document.getElementById('viewer-image').naturalWidth > 0")
        assert page.get_attribute("#viewer-image", "src") == f"/image/{shown[0]}?index=b"
        assert page.locator("#viewer-captions li").first.text_content() == PAIRS_B[shown[0]][1][0]
        page.reload()  # a reload keeps the index and the query
        wait_until(page, "document.querySelectorAll('#results .card').length === 20")
        assert page.input_value("#index-picker") == "b"
        page.close()


def test_one_index_shows_no_picker_and_keeps_its_urls(work):
    client = create_app(index=work / "a" / "photos", runtime="torch").test_client()
    assert 'id="index-picker"' not in client.get("/").get_data(as_text=True)
    first = client.get("/api/search?q=red&k=1").get_json()["results"][0]
    assert first["thumbnail"] == f"/thumb/{first['id']}"
    assert client.get("/indices-list").get_json() == ["photos"]
    assert client.get("/api/indexes").get_json()[0]["default"] is True
