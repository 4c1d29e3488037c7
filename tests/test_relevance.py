"""Calibrated relevance (search/relevance.py): the fit on synthetic vectors whose relevance is known, its contracts,
the hook that stores it in every built or updated index, and the issue's check on the trained demo."""
import json
import math
import os
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from benchmarks.calibration import absent_queries, at_level, held_out_mask, language_held_out_mask, measure
from demo.scenes import BACKGROUNDS, COLOURS, COLOURS_ZH, SHAPES, SHAPES_ZH, SIZES, captions, random_scene
from indexer.cli import main as indexer_main
from search import relevance
from search.catalog import Catalog
from search.manifest import Manifest, read_manifest
from search.relevance import DEFAULT_PRECISION_TARGET, QUERY_KINDS, Calibration, fit_calibration, gap_cut, isotonic

from .helpers import make_pairs, write_csv, write_flickr8k, write_images

ROOT = Path(__file__).resolve().parents[1]


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n_images=300, per_image=3, dim=24, seed=0):
    """Images in topics (groups of 3); each caption = its image + noise of a random strength, so some captions
    point clearly at their image and others barely."""
    rng = np.random.default_rng(seed)
    topics = _unit(rng.normal(size=(n_images // 3, dim)))
    images = _unit(np.repeat(topics, 3, 0) + 0.35 * rng.normal(size=(n_images, dim)))
    owners = np.repeat(np.arange(n_images), per_image)
    noise = rng.uniform(0.2, 1.6, (len(owners), 1)) * rng.normal(size=(len(owners), dim)) / math.sqrt(dim)
    return images, _unit(images[owners] + noise), owners


def test_relevance_is_calibrated_on_held_out_data_from_the_same_source():
    images, captions, owners = synthetic(seed=0)
    cal = fit_calibration(images, captions, owners)
    assert all(cal.calibrated(kind) for kind in QUERY_KINDS)
    # a fresh draw: predicted relevance must match the observed share of right answers, over the whole collection
    images, captions, owners = synthetic(seed=7)
    predicted = cal.relevance("text_image", captions @ images.T)
    truth = owners[:, None] == np.arange(len(images))[None, :]
    assert abs(predicted.sum() - truth.sum()) / truth.sum() < 0.15  # calibration in the large
    for lo, hi in ((0.05, 0.3), (0.3, 0.7), (0.7, 1.01)):
        band = (predicted >= lo) & (predicted < hi)
        assert band.sum() >= 30
        assert abs(truth[band].mean() - predicted[band].mean()) < 0.12, (lo, hi)
    # ranked by relevance, the right answers come first: a kept share of own images at every level
    own = predicted[truth]
    assert np.mean(own >= 0.5) > np.mean(predicted[~truth] >= 0.5) * 50


def test_maps_are_monotone_and_min_score_inverts_them():
    cal = fit_calibration(*synthetic(seed=1))
    grid = np.linspace(-1, 1, 2001)
    for kind in QUERY_KINDS:
        values = cal.relevance(kind, grid)
        assert np.all(np.diff(values) >= 0) and values.min() >= 0 and values.max() <= 1
        for level in (0.01, 0.1, 0.3, 0.5, 0.8):
            cut = cal.min_score(kind, level)
            if math.isfinite(cut):
                assert cal.relevance(kind, [cut])[0] >= level - 1e-9
                assert cal.relevance(kind, [cut - 1e-4])[0] < level
        assert cal.min_score(kind, 0.0) == -math.inf and cal.min_score(kind, 1.01) == math.inf


def test_image_to_image_relevance_follows_caption_agreement():
    images, captions, owners = synthetic(seed=2)
    cal = fit_calibration(images, captions, owners)
    scores = images @ images.T
    rel = cal.relevance("image_image", scores)
    topic = np.arange(len(images)) // 3
    same = (topic[:, None] == topic[None, :]) & ~np.eye(len(images), dtype=bool)
    assert rel[same].mean() > 3 * rel[~same].mean()
    assert 0 < cal.fitted_on["agreement_threshold"] < 1


def test_isotonic_matches_scikit_learn():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    y, w = rng.random(500) + np.linspace(0, 1, 500), rng.uniform(0.1, 5, 500)
    expected = IsotonicRegression().fit(np.arange(500), y, sample_weight=w).predict(np.arange(500))
    got = np.empty(500)
    for first, last, value in isotonic(y, w):
        got[first:last + 1] = value
    np.testing.assert_allclose(got, expected, atol=1e-9)


class CountingRows:
    """An array stand-in that records how many rows were read."""

    def __init__(self, array):
        self.array, self.read = array, 0
        self.shape = array.shape

    def __len__(self):
        return len(self.array)

    def __getitem__(self, rows):
        out = self.array[rows]
        self.read += len(out)
        return out


def test_big_indexes_are_fitted_on_a_bounded_sample_with_the_same_result(monkeypatch):
    images, captions, owners = synthetic(n_images=1200, seed=4)
    full = fit_calibration(images, captions, owners)
    monkeypatch.setattr(relevance, "MAX_SAMPLE_IMAGES", 250)
    monkeypatch.setattr(relevance, "MAX_SAMPLE_CAPTIONS", 600)
    counted_images, counted_captions = CountingRows(images), CountingRows(captions)
    sampled = fit_calibration(counted_images, counted_captions, owners)
    # images: the sample; captions: queries and halves (3 per sampled image, twice) and the image→text pool
    assert counted_images.read == 250 and counted_captions.read <= 3 * 250 * 3 + 600 < len(captions)
    assert sampled.fitted_on["sampled_images"] == 250
    grid = np.linspace(-1, 1, 401)
    for kind in QUERY_KINDS:  # negatives re-weighted: the same score → relevance map, up to sampling noise
        assert np.abs(sampled.relevance(kind, grid) - full.relevance(kind, grid)).mean() < 0.02, kind
    for level in (0.1, 0.3, 0.5):
        assert abs(sampled.min_score("text_image", level) - full.min_score("text_image", level)) < 0.02, level
    assert fit_calibration(images, captions, owners).to_json() == sampled.to_json()  # deterministic for a seed
    assert fit_calibration(images, captions, owners, seed=9).to_json() != sampled.to_json()


def test_too_little_data_leaves_kinds_uncalibrated():
    images, captions, owners = synthetic(seed=5)
    empty = fit_calibration(images, captions[:0], owners[:0])
    assert empty.to_json() == {} and Calibration.from_dict({}) == Calibration()
    assert empty.relevance("text_image", np.ones(3)) is None and empty.min_score("text_image", 0.5) == math.inf
    assert "not calibrated" in empty.summary()
    one_each = fit_calibration(images, captions[::3], owners[::3])  # one caption an image: no agreement to judge
    assert one_each.calibrated("text_image") and not one_each.calibrated("image_image")
    few = fit_calibration(images[:6], captions[:18], owners[:18])
    assert not few.calibrated("text_image")


def test_round_trip_through_the_manifest(tiny_encoder):
    cal = fit_calibration(*synthetic(seed=6))
    manifest = Manifest(tiny_encoder.spec, tiny_encoder.fingerprint, 24, 300, 900, relevance=cal.to_json())
    again = Manifest.from_dict(json.loads(manifest.to_json()))
    assert Calibration.from_dict(again.relevance) == cal
    scores = np.linspace(0, 1, 50)
    np.testing.assert_array_equal(Calibration.from_dict(again.relevance).relevance("image_text", scores),
                                  cal.relevance("image_text", scores))


def test_l2_scores_are_distances():
    images, captions, owners = synthetic(seed=8)
    ip, l2 = fit_calibration(images, captions, owners), fit_calibration(images, captions, owners, metric="l2")
    cosine = np.linspace(0, 1, 101)
    np.testing.assert_allclose(l2.relevance("text_image", 2 - 2 * cosine), ip.relevance("text_image", cosine),
                               atol=0.03)


@pytest.mark.parametrize("scores, keep", [
    ([0.9, 0.89, 0.88, 0.5, 0.49, 0.48], 3),  # a clear break after three
    ([0.9, 0.8, 0.7, 0.6, 0.5], 5),  # even steps: no break, keep all
    ([0.95, 0.6, 0.59, 0.58, 0.57], 1),
    ([0.1, 0.11, 0.12, 0.7, 0.71], 3),  # distances (l2): the same rule
    ([0.9, 0.1], 2), ([], 0),
])
def test_gap_cut(scores, keep):
    assert gap_cut(np.array(scores)) == keep


def _fit_of(index: Path) -> dict:
    links = Catalog(index / "catalog.sqlite").caption_image_ids()
    return fit_calibration(np.load(index / "image_vectors.npy"), np.load(index / "caption_vectors.npy"), links,
                           read_manifest(index).metric).to_json()


def test_a_build_through_the_cli_stores_the_calibration(tmp_path, tiny_model_spec):
    pairs = make_pairs(14, seed=2)
    write_images(tmp_path / "images", pairs)
    token = write_flickr8k(tmp_path, pairs, ["train"] * len(pairs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "flickr8k", "--annotations",
                           token.name, "--images", "images", "--out", "index", "--model", tiny_model_spec],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "relevance calibrated on 14 images / 42 captions" in done.stderr + done.stdout
    index = tmp_path / "index"
    stored = read_manifest(index).relevance
    assert stored and stored == _fit_of(index)
    assert Calibration.from_dict(stored).calibrated("text_image")
    assert stored["fitted_on"]["images"] == 14 and stored["fitted_on"]["captions"] == 42


def test_update_refits_and_images_alone_are_not_calibrated(tmp_path, tiny_model_spec, caplog):
    pairs = make_pairs(16, seed=3)
    photos = write_images(tmp_path / "photos", pairs)
    ann = write_csv(tmp_path / "pairs.csv", pairs[:12])
    index = tmp_path / "index"
    caplog.set_level("INFO", logger="indexer.writer")
    assert indexer_main(["build", "--format", "csv", "--annotations", str(ann), "--images", str(photos), "--out",
                         str(index), "--model", tiny_model_spec, "--quiet"]) == 0
    assert "relevance calibrated on 12 images / 36 captions" in caplog.text
    before = read_manifest(index).relevance
    assert before == _fit_of(index)
    write_csv(ann, pairs[3:16])
    assert indexer_main(["update", "--index", str(index), "--quiet"]) == 0
    after = read_manifest(index).relevance
    assert after == _fit_of(index) and after != before and after["fitted_on"]["images"] == 13
    folder = tmp_path / "folder_index"
    assert indexer_main(["build", "--format", "folder", "--images", str(photos), "--out", str(folder), "--model",
                         tiny_model_spec, "--quiet"]) == 0
    assert read_manifest(folder).relevance == {}
    on_disk = tmp_path / "on_disk"  # the writer's other branch: fitted on rows read from the memory-mapped vectors
    assert indexer_main(["build", "--format", "csv", "--annotations", str(ann), "--images", str(photos), "--out",
                         str(on_disk), "--model", tiny_model_spec, "--on-disk", "--memory-budget", "64MB",
                         "--quiet"]) == 0
    assert read_manifest(on_disk).relevance == _fit_of(on_disk) != {}


def test_on_disk_builds_from_embeddings_are_calibrated_on_a_bounded_sample(tmp_path, tiny_model_spec, monkeypatch):
    pairs = make_pairs(16, seed=4)
    photos = write_images(tmp_path / "photos", pairs)
    ann = write_csv(tmp_path / "pairs.csv", pairs)
    index, emb = tmp_path / "index", tmp_path / "emb"
    assert indexer_main(["build", "--format", "csv", "--annotations", str(ann), "--images", str(photos), "--out",
                         str(index), "--model", tiny_model_spec, "--quiet"]) == 0
    assert indexer_main(["export", "--index", str(index), "--out", str(emb), "--rows-per-file", "10"]) == 0
    build = ["build", "--format", "embeddings", "--embeddings", str(emb), "--images", str(photos), "--on-disk",
             "--memory-budget", "64MB", "--quiet", "--out"]
    assert indexer_main(build + [str(tmp_path / "on_disk")]) == 0
    stored = read_manifest(tmp_path / "on_disk").relevance
    assert stored and stored == _fit_of(tmp_path / "on_disk")
    original = Calibration.from_dict(read_manifest(index).relevance)  # the same vectors, exported and streamed back
    grid = np.linspace(-1, 1, 401)
    for kind in QUERY_KINDS:
        assert np.abs(Calibration.from_dict(stored).relevance(kind, grid) - original.relevance(kind, grid)).max() < 0.01
    monkeypatch.setattr(relevance, "MAX_SAMPLE_IMAGES", 10)  # a big index: a sample of the memory-mapped rows
    assert indexer_main(build + [str(tmp_path / "sampled")]) == 0
    sampled = read_manifest(tmp_path / "sampled").relevance
    assert sampled["fitted_on"]["images"] == 16 and sampled["fitted_on"]["sampled_images"] == 10
    assert sampled == _fit_of(tmp_path / "sampled")


# -- the check: held-out captions keep their image, queries about absent things return nothing -------------
# benchmarks/calibration.py's `measure`: per caption language, hold out 2 of each image's 5 captions in it, fit on all
# the other captions and query with the 2 (5 folds); per colour / shape of the demo, the collection without it, fitted
# on all its captions, queried in the demo's grammar of each language.

DIM = 64
_WEIGHTS = {**dict.fromkeys(COLOURS, 1.0), **dict.fromkeys(SHAPES, 1.0), **dict.fromkeys(["one", "two", "three"], 0.5),
            **dict.fromkeys(SIZES, 0.4), **dict.fromkeys(["left", "right", "top", "bottom"], 0.4),
            **dict.fromkeys(BACKGROUNDS, 0.3)}
_NUMBER_WORDS = {"a": "one", "1": "one", "2": "two", "3": "three"}


def _word(word: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(word.encode())).normal(size=DIM)


def bag_encoder(noise: float, shape_weight: float = 1.0, binding: float = 1.5, seed: int = 1):
    """A model that knows the demo's words: a text is the sum of its factor words' vectors (shape plurals folded),
    plus a vector per colour–shape pair (`binding`), normalised, plus noise. `shape_weight` < 1: a model that tells
    shapes apart badly, like the trained demo's."""
    rng = np.random.default_rng(seed)

    def one(text: str) -> np.ndarray:
        vector, previous = np.zeros(DIM), None
        for token in re.findall(r"\w+", text.lower()):
            token = _NUMBER_WORDS.get(token, token)
            token = next((shape for shape in SHAPES if token in (shape, shape + "s", shape + "es")), token)
            vector += _WEIGHTS.get(token, 0.0) * (shape_weight if token in SHAPES else 1.0) * _word(token)
            if previous in COLOURS and token in SHAPES:
                vector += binding * _word(f"{previous} {token}")
            previous = token
        return vector / np.linalg.norm(vector)

    def encode(texts) -> np.ndarray:
        return _unit(np.stack([one(t) for t in texts]) + noise * rng.normal(size=(len(texts), DIM)) / math.sqrt(DIM))

    return encode


def scene_collection(encode_images, encode_texts, n=300, seed=0):
    """`n` distinct demo scenes, each image encoded from one more of its captions (noisier), its 5 captions."""
    rng = random.Random(seed)
    scenes = list(dict.fromkeys(random_scene(rng) for _ in range(2 * n)))[:n]
    texts = [c for scene in scenes for c in captions(scene, rng)]
    images = encode_images([captions(scene, rng)[0] for scene in scenes])
    return images, encode_texts(texts), np.repeat(np.arange(n), 5), scenes


def test_held_out_captions_keep_their_image_and_absent_colours_and_shapes_return_nothing():
    """The check on a model that knows colours and shapes (the demo grammar, synthetic encoder): at the default
    target ≥ 90% of held-out captions keep their image, ≥ 90% of queries about an absent colour or shape keep nothing,
    and the calibration delivers the precision it promises."""
    encode = bag_encoder(0.6)
    found = measure(*scene_collection(bag_encoder(0.8, seed=2), encode), encode, n_queries=100)
    row = at_level(found["held_out"], DEFAULT_PRECISION_TARGET)
    assert row["recall"] >= 0.9 and row["kept"] > 1.5  # more than the own image: a cut that does not keep all
    assert abs(row["precision"] - row["predicted"]) < 0.05
    assert set(found["absent"]) == {f"colour {c}" for c in COLOURS} | {f"shape {s}" for s in SHAPES}
    for key, rows in found["absent"].items():
        assert at_level(rows, DEFAULT_PRECISION_TARGET)["empty"] >= 0.9, key


def test_the_check_fails_for_a_model_that_confuses_shapes():
    """The same check with a model weak on shapes (as the trained demo's): absent shapes are no longer empty — the
    map cannot invent a distinction the scores do not carry."""
    encode = bag_encoder(0.6, shape_weight=0.3, binding=0.0)
    found = measure(*scene_collection(bag_encoder(0.8, shape_weight=0.3, binding=0.0, seed=2), encode), encode,
                    n_queries=100, values={"shape": ["circle", "cross"]})
    assert all(at_level(rows, DEFAULT_PRECISION_TARGET)["empty"] < 0.9 for rows in found["absent"].values())


def test_held_out_folds_hold_out_two_captions_of_each_image_in_turn():
    owners = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 2, 2, 2])  # image 2's captions interleaved with image 3's
    masks = np.stack([held_out_mask(owners, fold) for fold in range(5)])
    assert masks[:, owners == 0].sum(0).tolist() == [2] * 5  # each of 5 captions held out twice over 5 folds
    assert masks[:, owners == 3].sum() == 0  # one caption: always fitted on
    for fold in range(5):
        for image in (0, 1, 2):
            assert masks[fold, owners == image].sum() == 2
        assert masks[fold][owners == 0].tolist() == [(r - fold) % 5 < 2 for r in range(5)]


def test_held_out_captions_of_one_language_leave_the_other_language_to_the_fit():
    """The demo's layout: 5 English then 5 Chinese captions per image; a language's folds hold out 2 of that
    language's 5 per image in turn and never a caption of the other."""
    owners = np.repeat(np.arange(3), 10)
    languages = np.array((["en"] * 5 + ["zh"] * 5) * 3)
    for language in ("en", "zh"):
        masks = np.stack([language_held_out_mask(owners, languages, language, fold) for fold in range(5)])
        assert not masks[:, languages != language].any()
        assert masks[:, languages == language].sum(0).tolist() == [2] * 15  # each held out twice over 5 folds
        for fold in range(5):
            assert [masks[fold, owners == image].sum() for image in range(3)] == [2, 2, 2]


@pytest.mark.parametrize("language, words", [("en", (COLOURS, SHAPES)), ("zh", (COLOURS_ZH, SHAPES_ZH))])
def test_absent_queries_name_the_absent_value_and_no_other_of_its_kind(language, words):
    colour_words, shape_words = ({w: w for w in names} if language == "en" else names for names in words)
    for what, names, value in (("colour", colour_words, "purple"), ("shape", shape_words, "cross")):
        queries = absent_queries(what, value, 60, language=language)
        assert len(set(queries)) > 30
        for query in queries:
            named = {key for key, word in names.items() if word in query}
            assert named == {value}, query
            assert (re.search(r"[\u4e00-\u9fff]", query) is not None) == (language == "zh"), query


def _full_demo() -> Path:
    """The trained full demo's index ($DEMO_DIR, default the repo's demo_data, as `python -m web --demo` leaves it);
    skip when there is none: training it takes ~11 minutes on 2 cores, too long for CI."""
    from demo import SCALES

    root = Path(os.environ.get("DEMO_DIR", ROOT / "demo_data"))
    try:
        run = json.loads((root / "model" / "training.json").read_text())
    except (OSError, ValueError):
        run = None
    if not run or run.get("recipe") != SCALES["full"].model_recipe() or not (root / "index" / "manifest.json").is_file():
        pytest.skip(f"no trained full demo in {root}: `python -m web --demo --prepare-only --demo-dir DIR` (~11 min "
                    f"once), then DEMO_DIR=DIR")
    return root / "index"


@pytest.fixture(scope="module")
def demo_measure():
    from benchmarks.calibration import measure_index

    return measure_index(_full_demo())


@pytest.mark.slow
def test_demo_held_out_captions_keep_their_image_and_absent_colours_return_nothing(demo_measure):
    assert demo_measure["same_as_index"]  # the benchmark's fit on the whole index is the one its build stored
    assert set(demo_measure["by_language"]) == {"en", "zh"}  # the demo's captions are English and Chinese
    for language, found in demo_measure["by_language"].items():
        row = at_level(found["held_out"], DEFAULT_PRECISION_TARGET)
        assert row["recall"] >= 0.9, language
        assert abs(row["precision"] - row["predicted"]) < 0.05, language  # what the calibration promises they get
        for colour in COLOURS:
            rows = found["absent"][f"colour {colour}"]
            assert at_level(rows, DEFAULT_PRECISION_TARGET)["empty"] >= 0.9, (language, colour)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the demo model tells shapes apart badly: 'a red circle' scores on a red "
                                       "triangle as on a red circle; 6-20% of absent-shape queries are empty at 0.03")
def test_demo_absent_shapes_return_nothing(demo_measure):
    for language, found in demo_measure["by_language"].items():
        for shape in SHAPES:
            rows = found["absent"][f"shape {shape}"]
            assert at_level(rows, DEFAULT_PRECISION_TARGET)["empty"] >= 0.9, (language, shape)
