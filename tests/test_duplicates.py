"""`indexer duplicates`: the exact tier against hashlib over the files; the near and similar tiers — groups against
scipy's connected components of the brute-force cosine graph, the calibration on real photos (scikit-image and
scikit-learn samples) and copies of them made here, the CLI as a user runs it, the web page in Chromium."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.near_duplicates import calibrate, fit_threshold, measure, near_copy, similar_copy
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import Sample
from search.dedupe import FALLBACK_THRESHOLDS, collapse, duplicate_report, groups
from search.encoders import Encoder, EncoderSpec
from search.store import open_index

from .browser import CHROMIUM, every_image_loaded, launch_browser, web_server
from .helpers import make_pairs, write_images

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "indexer", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # as installed, from any folder


def test_exact_duplicates_match_the_files_hashes(tiny_model_spec, tmp_path):
    """As a user runs it: a photo folder with copies under other names and in other folders, indexed and asked from
    the folder above with relative paths; the groups equal those of SHA-1 over the files themselves."""
    photos = write_images(tmp_path / "photos", make_pairs(8, seed=4))
    (photos / "trip").mkdir()
    shutil.copy(photos / "img_001.png", photos / "trip" / "copy of img_001.png")
    shutil.copy(photos / "img_001.png", photos / "img_001 (2).png")
    shutil.copy(photos / "img_005.png", photos / "trip" / "img_005.png")
    built = run("build", "--format", "folder", "--images", "photos", "--out", "index", "--model", tiny_model_spec,
                "--quiet", cwd=tmp_path)
    assert built.returncode == 0, built.stderr

    found = run("duplicates", "--index", "index", "--json", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    report = json.loads(found.stdout)

    by_hash: dict[str, list[str]] = {}
    for path in sorted(p for p in photos.rglob("*.png")):
        by_hash.setdefault(hashlib.sha1(path.read_bytes()).hexdigest(), []).append(path.relative_to(photos).as_posix())
    expected = sorted(sorted(paths) for paths in by_hash.values() if len(paths) > 1)
    assert sorted(sorted(g["paths"]) for g in report["groups"]) == expected and len(expected) == 2
    assert report["redundant"] == 3 and report["images"] == 11
    sizes = {name: (photos / name).stat().st_size for name in ("img_001.png", "img_005.png")}
    assert report["redundant_bytes"] == 2 * sizes["img_001.png"] + sizes["img_005.png"]

    text = run("duplicates", "--index", "index", cwd=tmp_path)
    assert text.returncode == 0 and "2 group(s) of identical files among 11 images; 3 redundant" in text.stdout


def test_an_index_without_file_hashes_says_why(tiny_model_spec, tmp_path):
    photos = write_images(tmp_path / "photos", make_pairs(3, seed=4))
    assert run("build", "--format", "folder", "--images", str(photos), "--out", "index", "--model", tiny_model_spec,
               "--quiet", cwd=tmp_path).returncode == 0
    assert run("export", "--index", "index", "--out", "emb", cwd=tmp_path).returncode == 0
    assert run("build", "--format", "embeddings", "--embeddings", "emb", "--out", "bare", cwd=tmp_path).returncode == 0
    done = run("duplicates", "--index", "bare", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no file hashes" in lines[0]


# ---- near and similar tiers ---------------------------------------------------------------------------------------

# skimage's photos with structure at thumbnail size (brick, grass and gravel flatten to noise in ThumbnailEncoder's
# 16 px view, so that any crop moves them far); its `cat` is chelsea again
PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
          "moon", "page", "retina", "rocket", "text")
COPIED = ("astronaut", "coffee", "rocket", "sample_1")


def write_photos(folder: Path, names=PHOTOS, copied=COPIED) -> dict[str, set[str]]:
    """Real photos (scikit-image, scikit-learn) as JPEGs, and near-duplicates of `copied` made as a user would:
    downsized and recompressed, slightly cropped, re-encoded as WebP. Returns each copied photo's group of paths."""
    data = pytest.importorskip("skimage.data")
    samples = pytest.importorskip("sklearn.datasets").load_sample_images().images
    arrays = {name: getattr(data, name)() for name in names} | {f"sample_{i}": a for i, a in enumerate(samples)}
    (folder / "copies").mkdir(parents=True)
    expected = {}
    for name, array in arrays.items():
        image = Image.fromarray(array).convert("RGB")
        image.save(folder / f"{name}.jpg", quality=90)
        if name in copied:
            w, h = image.size
            small = image.crop((w // 40, h // 40, w - w // 40, h - h // 40)).resize((w * 3 // 5, h * 3 // 5))
            small.save(folder / "copies" / f"{name} small.jpg", quality=40)
            image.resize((w * 7 // 10, h * 7 // 10)).save(folder / "copies" / f"{name}.webp", quality=70)
            expected[name] = {f"{name}.jpg", f"copies/{name} small.jpg", f"copies/{name}.webp"}
    return expected


class ThumbnailEncoder(Encoder):
    """A model-free encoder: the 16x16 colour thumbnail, centred, of unit length. The tiny random CLIPs of the other
    tests find any two photos >= 0.97 alike, so they cannot tell a copy from another photo; this one can, as a photo
    model does, which is what the calibration is tested on here."""

    spec = EncoderSpec("test", "thumbnail-16", None)
    dim = 16 * 16 * 3

    @property
    def fingerprint(self) -> str:
        return "thumbnail-16"

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BOX), np.float32).ravel()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        centred = pixels - pixels.mean(axis=1, keepdims=True)
        return (centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32)

    def encode_texts(self, texts) -> np.ndarray:
        return np.zeros((len(texts), self.dim), np.float32)


def brute_force_groups(vectors: np.ndarray, threshold: float, exact=()) -> list[list[int]]:
    """The oracle: scipy's connected components of the full cosine matrix thresholded, exact groups joined."""
    from scipy.sparse.csgraph import connected_components

    unit = np.asarray(vectors, np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    adjacency = unit @ unit.T >= threshold
    for group in exact:
        adjacency[np.ix_(group, group)] = True
    count, labels = connected_components(adjacency, directed=False)
    return sorted(np.flatnonzero(labels == c).tolist() for c in range(count) if (labels == c).sum() > 1)


def test_groups_equal_connected_components_of_the_cosine_graph(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 24))
    vectors = centres[rng.integers(0, 40, 300)] + rng.normal(size=(300, 24)) * rng.uniform(0.05, 0.6, (300, 1))
    monkeypatch.setattr("search.dedupe.BLOCK_ROWS", 64)  # several blocks, and rows past the last full one
    exact = [[3, 250], [17, 120, 299]]
    for threshold in (0.8, 0.9, 0.97):
        found = [g.tolist() for g in groups(vectors.astype(np.float32), threshold, exact)]
        assert found == brute_force_groups(vectors, threshold, exact) and len(found) > 5
    assert [g.tolist() for g in groups(vectors.astype(np.float16), 0.9)] == brute_force_groups(
        vectors.astype(np.float16), 0.9)


def test_collapse_keeps_the_best_ranked_of_each_near_duplicate_set():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(12, 16))
    vectors = base[rng.integers(0, 12, 60)] + rng.normal(size=(60, 16)) * 0.15
    ids = rng.permutation(1000)[:60]
    ids[40] = ids[5]  # a repeated id is dropped whatever its vector
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    kept = collapse(ids, vectors, 0.9).tolist()
    assert kept == sorted(kept) and kept[0] == 0 and 40 not in kept and 12 <= len(kept) < 60
    assert all(cosine[a, b] < 0.9 for a in kept for b in kept if a < b)  # no two kept hits are near-duplicates
    for dropped in set(range(60)) - set(kept):  # each dropped hit has a better-ranked kept one it duplicates
        assert any(k < dropped and (cosine[dropped, k] >= 0.9 or ids[k] == ids[dropped]) for k in kept)
    assert collapse(ids[:0], vectors[:0], 0.9).tolist() == []


def test_threshold_fit_and_measure():
    positives, negatives = np.array([0.95, 0.97, 0.99, 0.8]), np.array([0.5, 0.7, 0.85, 0.6])
    threshold = fit_threshold(positives, negatives)
    assert threshold == pytest.approx(0.9)  # between 0.85 and 0.95: 3 of 4 copies, no other image
    assert measure(threshold, positives, negatives) == {"threshold": 0.9, "precision": 1.0, "recall": 0.75, "pairs": 8}
    assert measure(1.5, positives, negatives)["precision"] is None


def test_copies_are_made_as_the_tiers_describe():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    rng = np.random.default_rng(3)
    for _ in range(6):
        near, similar = near_copy(image, rng), similar_copy(image, rng)
        assert 0.5 * 0.9 * 400 <= near.width <= 0.8 * 400 + 1 and near.mode == "RGB"
        assert 0.7 * 400 - 1 <= similar.width <= 0.85 * 400 + 1 and similar.mode == "RGB"


def test_calibrated_near_tier_groups_copies_of_real_photos_and_nothing_else(tmp_path):
    """Through the real build pipeline: photos and copies of four of them, calibrated at build time; the near tier's
    groups are exactly each copied photo with its copies, and the calibration is deterministic."""
    root = tmp_path / "photos"
    expected = write_photos(root)
    encoder = ThumbnailEncoder()
    samples = [Sample(p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.*"))]
    build_index(samples, root, encoder, tmp_path / "index", BuildConfig(progress=False, workers=1))
    index = open_index(tmp_path / "index")
    calibration = index.manifest.near_duplicates
    assert set(calibration) == {"near", "similar"}
    assert calibration["similar"]["threshold"] <= calibration["near"]["threshold"] < 1
    assert calibration["near"]["pairs"] > 20 and calibration["near"]["recall"] >= 0.9

    report = duplicate_report(index, "near")
    assert sorted(map(set, (g.paths for g in report.groups)), key=sorted) == sorted(expected.values(), key=sorted)
    assert all(g.paths[0].endswith(".jpg") and "/" not in g.paths[0] for g in report.groups)  # the original is kept
    assert report.threshold.calibrated and report.threshold.threshold == calibration["near"]["threshold"]
    ids = sorted(sorted(g.ids) for g in report.groups)
    assert ids == brute_force_groups(index.vectors("images"), calibration["near"]["threshold"])

    records = {r.id: (r.path, r.sha1) for r in index.catalog.all_images()}
    again = calibrate(index.vectors("images"), lambda wanted: {i: records[i] for i in wanted}, root, encoder, 100.0)
    assert again == calibration


def test_near_and_similar_tiers_from_the_cli(tiny_model_spec, tmp_path):
    """As a user runs it, from another folder with relative paths: the groups of both vector tiers equal the oracle's
    at the threshold the manifest stores, and the output prints the calibration's precision and recall."""
    write_photos(tmp_path / "photos", names=PHOTOS[:6], copied=("astronaut", "coffee"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    built = run("build", "--format", "folder", "--images", "../photos", "--out", "../index", "--model", tiny_model_spec,
                cwd=elsewhere)
    assert built.returncode == 0, built.stderr
    assert built.stderr.count("near-duplicate calibration: near cosine >= ") == 1  # the one log line
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    vectors = np.load(tmp_path / "index" / "image_vectors.npy")
    for tier in ("near", "similar"):
        calibration = manifest["near_duplicates"][tier]
        found = run("duplicates", "--index", "../index", "--tier", tier, "--json", cwd=elsewhere)
        assert found.returncode == 0, found.stderr
        report = json.loads(found.stdout)
        assert report["threshold"] == {"tier": tier, "calibrated": True, **calibration}
        assert sorted(sorted(g["ids"]) for g in report["groups"]) == brute_force_groups(vectors,
                                                                                          calibration["threshold"])
        text = run("duplicates", "--index", "../index", "--tier", tier, cwd=elsewhere)
        assert text.returncode == 0, text.stderr
        assert (f"{tier} tier: cosine >= {calibration['threshold']:.3f}, calibrated on copies of this index's own "
                f"photos: precision {100 * calibration['precision']:.1f} %, recall {100 * calibration['recall']:.1f} %"
                f" on {calibration['pairs']} held-out pairs") in text.stdout
        assert f"{len(report['groups'])} group(s) of {tier}-duplicates among {len(vectors)} images" in text.stdout


def test_an_index_without_calibration_uses_the_fallback_and_says_so(tiny_model_spec, tmp_path):
    photos = write_images(tmp_path / "photos", make_pairs(3, seed=4))
    assert run("build", "--format", "folder", "--images", str(photos), "--out", "index", "--model", tiny_model_spec,
               "--quiet", cwd=tmp_path).returncode == 0
    assert run("export", "--index", "index", "--out", "emb", cwd=tmp_path).returncode == 0
    assert run("build", "--format", "embeddings", "--embeddings", "emb", "--out", "bare", cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["near_duplicates"] == {}  # under 4 images
    done = run("duplicates", "--index", "bare", "--tier", "near", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"near tier: cosine >= {FALLBACK_THRESHOLDS['near']:.3f}, a fallback: this index has no" in done.stdout
    report = json.loads(run("duplicates", "--index", "bare", "--tier", "near", "--json", cwd=tmp_path).stdout)
    assert report["threshold"]["calibrated"] is False and report["threshold"]["precision"] is None


# ---- the page -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, tiny_model_spec):
    root = tmp_path_factory.mktemp("duplicates")
    write_photos(root / "photos", names=PHOTOS[:6], copied=("astronaut", "coffee"))
    shutil.copy(root / "photos" / "camera.jpg", root / "photos" / "copies" / "camera again.jpg")
    built = run("build", "--format", "folder", "--images", "photos", "--out", "index", "--model", tiny_model_spec,
                "--quiet", cwd=root)
    assert built.returncode == 0, built.stderr
    return root / "index"


def test_the_page_lists_each_tier_with_its_calibration(photo_index):
    from web import create_app

    client = create_app(index=str(photo_index)).test_client()
    manifest = open_index(photo_index).manifest
    for tier in ("exact", "near", "similar"):
        page = client.get(f"/duplicates?tier={tier}")
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        report = duplicate_report(open_index(photo_index), tier)
        assert html.count('<section class="group"') == len(report.groups) > 0
        assert html.count('<li class="card"') == sum(len(g.ids) for g in report.groups)
        if tier != "exact":
            precision = manifest.near_duplicates[tier]["precision"]
            assert f"precision {100 * precision:.1f} %" in html
    assert client.get("/duplicates").get_data(as_text=True).count('aria-current="page"') == 1
    assert client.get("/duplicates?tier=loose").status_code == 400
    assert 'href="/duplicates?tier=near"' in client.get("/").get_data(as_text=True)


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_in_a_browser_shows_every_thumbnail(photo_index):
    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip("chromium not installed")
    with web_server(photo_index) as url, launch_browser() as browser:
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(url)
        page.click("#duplicates-link")
        page.wait_for_selector("section.group")
        assert "calibrated on copies of this index" in page.text_content("#threshold")
        assert every_image_loaded(page) == page.locator("section.group img").count() >= 4
        page.click("#tiers a[data-tier=exact]")
        page.wait_for_selector("#tiers a[data-tier=exact][aria-current=page]")
        assert every_image_loaded(page) == 2  # camera.jpg and its byte-identical copy
        assert "camera again.jpg" in page.text_content("main")
        page.click("#tiers a[data-tier=similar]")
        page.wait_for_selector("#tiers a[data-tier=similar][aria-current=page]")
        every_image_loaded(page)
        page.close()
