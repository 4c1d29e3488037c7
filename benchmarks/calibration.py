"""Calibrated relevance (search/relevance.py) on a captioned scene index (the trained demo's): the curve of cutoff
level → recall and precision of held-out caption queries, and the share of queries about absent things that return
nothing.

    python -m benchmarks.calibration                      # demo_data (prepared first when missing: ~11 min once)
    python -m benchmarks.calibration --demo-dir /tmp/demo_data
    python -m benchmarks.calibration --scale 100000       # also: fit time on 100k synthetic float16 vectors on disk

The issue's check, as measured here (`measure`):
- held-out captions, per caption language (search.query_features.caption_language; the demo writes 5 English and
  5 Chinese captions per scene): in fold f (FOLDS of them) 2 of every image's 5 captions in that language are held
  out (ranks f and f+1 among them, so every caption is held out twice over the folds) and the calibration is fitted
  on all the other captions, of both languages, as a build of the collection without them would be
  (indexer/writer.with_relevance fits on every caption of the index); recall = share of held-out queries whose own
  image has relevance ≥ the level, precision = own images kept / all hits kept, predicted = mean relevance of the
  kept hits.
- absent things: for a colour (or a shape) of the demo, the collection is the index's scenes WITHOUT any group of it
  (demo/scenes.py's groups, read back from the English captions), fitted on all that subset's captions as a build of
  it would be; queries in the demo's grammar of each caption language name that colour (shape): a one-group scene's
  caption ("there is two purple circles and nothing else", "只有两个紫色的大圆，没有别的") or a group and a side
  ("three small purple crosses on the left", "三个紫色的小十字在左边"). empty = share of queries keeping no image at
  that level.
At a level P the kept hits of a query are all images (the whole collection, not a top k) with relevance ≥ P.
Honest records beside the check, fitted on all captions: captions reworded in templates the demo never writes, and
words the model never saw ("a pink hexagon": unknown words are ignored by the model, so it encodes like "a …").
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from demo.scenes import (BACKGROUNDS, COLOURS, NUMBERS, SHAPES, SIDES_ZH, SIZES, Group, Scene, captions, captions_zh,
                         random_group)
from search.query_features import LANGUAGES, caption_language
from search.relevance import DEFAULT_PRECISION_TARGET, Calibration, fit_calibration

LEVELS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FOLDS, HELD_OUT = 5, 2  # held-out captions per image and fold
SIDES = ("left", "right", "top", "bottom")
UNKNOWN_COLOURS = ("pink", "brown", "cyan", "turquoise", "golden", "silver")  # never in the demo's captions
UNKNOWN_SHAPES = ("hexagon", "star", "heart", "pentagon", "oval", "arrow", "crescent", "ring")
_PHRASE = (rf"(a|one|two|three|1|2|3) (?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(?:es|s)?")
_NUMBER = {"a": 1, "one": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}


def _group(match: tuple) -> Group:
    number, size, colour, shape = match
    return Group(_NUMBER[number], colour, shape, size)


def parse_scene(lines: list[str]) -> Scene | None:
    """The scene a demo image's captions describe (the English templates of demo/scenes.py naming every factor; lines
    in other languages are passed over)."""
    lines = [line for line in lines if caption_language(line) == "en"]
    background = next((m.group(1) for line in lines for m in [re.search(r"(?:on a|^a) (\w+) (?:background|picture)",
                                                                          line)] if m), None)
    for line in lines:
        if m := re.fullmatch(rf"{_PHRASE} on the (left|top) and {_PHRASE} on the (right|bottom)", line):
            g = m.groups()
            layout = "left-right" if g[4] == "left" else "top-bottom"
            return Scene((_group(g[:4]), _group(g[5:9])), layout, background)
        if m := re.fullmatch(rf"{_PHRASE} on a (\w+) background", line):
            return Scene((_group(m.groups()[:4]),), "centre", m.group(5))
    return None


def reworded(scene: Scene, rng: random.Random) -> str:
    """A caption of `scene` in a template the demo never writes (words it does use)."""
    def phrase(g: Group) -> str:
        return g.phrase(with_size=rng.random() < 0.5, digits=rng.random() < 0.3)

    if scene.layout == "centre":
        g, bg = phrase(scene.groups[0]), scene.background
        return rng.choice([f"there is {g} in the middle", f"a picture of {g} on a {bg} background",
                           f"{g} in the centre", f"a {bg} picture with {g} in the middle"])
    a, b = (phrase(g) for g in scene.groups)
    first, second = ("left", "right") if scene.layout == "left-right" else ("top", "bottom")
    relation = "to the left of" if first == "left" else "above"
    return rng.choice([f"{a} on the {first}, {b} on the {second}", f"there is {a} on the {first} and {b} on the "
                       f"{second}", f"a picture with {a} {relation} {b}", f"{second}: {b}. {first}: {a}"])


def absent_queries(what: str, value: str, n: int, seed: int = 1, language: str = "en") -> list[str]:
    """`n` queries in the demo's grammar of `language` ("en", "zh") about one group whose `what` ("colour" or "shape")
    is `value`, the rest random: half a one-group scene's caption (captions(), captions_zh()), half the group's phrase
    and a side ("… on the left", "…在左边")."""
    rng = random.Random(f"{what} {value} {seed}" + ("" if language == "en" else f" {language}"))
    queries = []
    while len(queries) < n:
        group = replace(random_group(rng), **{what: value})
        if rng.random() < 0.5:
            scene = Scene((group,), "centre", rng.choice(list(BACKGROUNDS)))
            queries.append(rng.choice((captions if language == "en" else captions_zh)(scene, rng)))
        elif language == "en":
            queries.append(f"{group.phrase(with_size=rng.random() < 0.5)} on the {rng.choice(SIDES)}")
        else:
            queries.append(f"{group.phrase_zh(with_size=rng.random() < 0.5)}在{SIDES_ZH[rng.choice(SIDES)]}")
    return queries


def unknown_word_queries(n: int, what: str, seed: int = 1) -> list[str]:
    """Queries naming a colour (`what` "colour") or a shape ("shape") no demo caption ever uses."""
    rng = random.Random(f"{what}{seed}")
    queries = []
    while len(queries) < n:
        count, size = rng.choice(list(NUMBERS)), rng.choice(SIZES + ("",))
        colour = rng.choice(UNKNOWN_COLOURS) if what == "colour" else rng.choice(list(COLOURS))
        shape = rng.choice(UNKNOWN_SHAPES) if what == "shape" or rng.random() < 0.5 else rng.choice(SHAPES)
        noun = shape + ("s" if count > 1 else "")
        text = " ".join(w for w in ("a" if count == 1 else NUMBERS[count], size, colour, noun) if w)
        queries.append(text + rng.choice(["", " on the left", " on the right", " on the top", " in the middle"]))
    return queries


def held_out_mask(owners: np.ndarray, fold: int, n_held: int = HELD_OUT) -> np.ndarray:
    """Captions held out in `fold`: per image, those of rank fold … fold+n_held-1 (mod its caption count) among its
    captions in caption order; an image with fewer than n_held + 1 captions keeps them all for the fit."""
    order = np.argsort(owners, kind="stable")
    starts = np.searchsorted(owners[order], owners[order])
    rank = np.empty(len(owners), np.int64)
    rank[order] = np.arange(len(owners)) - starts
    counts = np.bincount(owners)[owners]
    return (counts > n_held) & ((rank - fold) % np.maximum(counts, 1) < n_held)


def language_held_out_mask(owners: np.ndarray, languages: np.ndarray, language: str, fold: int) -> np.ndarray:
    """held_out_mask among the captions in `language` (a code per caption in `languages`); the others are never
    held out."""
    mask = np.zeros(len(owners), bool)
    chosen = np.flatnonzero(languages == language)
    mask[chosen] = held_out_mask(owners[chosen], fold)
    return mask


def _subset(images, texts, owners, keep: np.ndarray):
    """The collection of the images `keep` (a mask): their vectors, their captions' vectors and renumbered owners."""
    ids = np.flatnonzero(keep)
    renumber = np.full(len(keep), -1)
    renumber[ids] = np.arange(len(ids))
    own = keep[owners]
    return images[ids], texts[own], renumber[owners[own]]


def curve(cal: Calibration, images: np.ndarray, queries: np.ndarray | None = None, own: np.ndarray | None = None,
          absent: np.ndarray | None = None, kind: str = "text_image") -> list[dict]:
    """Per level of LEVELS: for `queries` whose right answer is image `own` recall, precision, predicted precision and
    hits kept per query; for `absent` queries (no right answer) the share that keep nothing."""
    rows = [{"level": level, "min_score": cal.min_score(kind, level)} for level in LEVELS]
    if queries is not None:
        rel = cal.relevance(kind, queries @ images.T)
        own_rel = rel[np.arange(len(own)), own]
        for row in rows:
            kept = rel >= row["level"]
            n_kept, hits = int(kept.sum()), int((own_rel >= row["level"]).sum())
            row.update(recall=hits / len(own), precision=hits / n_kept if n_kept else 1.0,
                       predicted=float(rel[kept].mean()) if n_kept else 1.0, kept=n_kept / len(own))
    if absent is not None:
        best = cal.relevance(kind, (absent @ images.T).max(1))  # the map is monotone: the best hit decides
        for row in rows:
            row["empty"] = float(np.mean(best < row["level"]))
    return rows


def _pooled(folds: list[list[dict]]) -> list[dict]:
    """Rows of equally sized folds averaged."""
    return [{key: float(np.mean([f[i][key] for f in folds])) for key in folds[0][i]} for i in range(len(LEVELS))]


def measure(images, texts, owners, scenes: list[Scene], encode, n_queries: int = 200, values: dict | None = None,
            languages=None) -> dict:
    """The issue's check on a scene collection: image and caption vectors, each caption's image id, each image's
    Scene, `encode` (texts → vectors, the index's model) and each caption's language code (default: all "en").
    {"held_out": rows pooled over FOLDS, "absent": {"colour red": rows, …}} of the first language of LANGUAGES
    present (English), and {"by_language": {code: {"held_out": …, "absent": …}}} of each, for the colours and shapes
    in `values` (default: every one the demo draws)."""
    images, texts = np.asarray(images, np.float32), np.asarray(texts, np.float32)
    owners = np.asarray(owners, np.int64)
    languages = np.full(len(owners), "en") if languages is None else np.asarray(languages)
    present = [code for code, _ in LANGUAGES if (languages == code).any()]
    found = {code: {"held_out": [], "absent": {}} for code in present}
    for code in present:
        folds = []
        for fold in range(FOLDS):
            held = language_held_out_mask(owners, languages, code, fold)
            cal = fit_calibration(images, texts[~held], owners[~held])  # every other caption, as a build fits
            folds.append(curve(cal, images, texts[held], owners[held]))
        found[code]["held_out"] = _pooled(folds)
    for what, names in (values or {"colour": list(COLOURS), "shape": list(SHAPES)}).items():
        for value in names:
            keep = np.array([all(getattr(g, what) != value for g in scene.groups) for scene in scenes])
            sub_images, sub_texts, sub_owners = _subset(images, texts, owners, keep)
            cal = fit_calibration(sub_images, sub_texts, sub_owners)  # all its captions, of every language
            for code in present:
                queries = np.asarray(encode(absent_queries(what, value, n_queries, language=code)), np.float32)
                rows = found[code]["absent"][f"{what} {value}"] = curve(cal, sub_images, absent=queries)
                rows[0]["images"] = len(sub_images)
    return {**found[present[0]], "by_language": found}


def measure_index(index_dir: Path, n_queries: int = 200) -> dict:
    """`measure` on an index of demo scenes with its own model, and the honest records (reworded captions, unknown
    words) under "records", with the calibration fitted on the whole index ("calibration"), "fit_seconds" and
    "same_as_index" (whether it equals the one the index's build stored)."""
    from search.searcher import Searcher

    searcher = Searcher.open(index_dir)
    index = searcher.index
    images, texts = np.asarray(index.image_vectors, np.float32), np.asarray(index.caption_vectors, np.float32)
    owners = np.asarray(index.catalog.caption_image_ids(), np.int64)
    lines = index.catalog.captions_of(range(len(images)))
    scenes = [parse_scene(lines[i]) for i in range(len(images))]
    if None in scenes:
        raise ValueError(f"image {scenes.index(None)}: cannot read its scene from {lines[scenes.index(None)]}")
    records = index.catalog.captions(range(len(owners)))
    languages = np.asarray([caption_language(records[i].text) for i in range(len(owners))])
    encode = lambda batch: np.asarray(searcher.encoder.encode_texts(batch), np.float32)  # noqa: E731
    found = measure(images, texts, owners, scenes, encode, n_queries, languages=languages)
    start = time.perf_counter()
    cal = fit_calibration(images, texts, owners, index.manifest.metric)
    found.update(calibration=cal, fit_seconds=time.perf_counter() - start)
    # the fit a build of this index stored (indexer/writer.with_relevance: every caption, both languages)
    found["same_as_index"] = json.loads(json.dumps(cal.to_json())) == index.manifest.relevance
    rng = random.Random(1)
    fresh = [reworded(scene, rng) for scene in scenes]
    found["records"] = {"reworded": curve(cal, images, encode(fresh), np.arange(len(images)))}
    for what in ("colour", "shape"):
        found["records"][f"unknown {what}"] = curve(cal, images, absent=encode(unknown_word_queries(n_queries, what)))
    found["examples"] = {"reworded": fresh[0], "unknown": unknown_word_queries(1, "shape")}
    return found


def fit_time(n_images: int, per_image: int = 5, dim: int = 512, repeats: int = 3) -> tuple[float, Calibration]:
    """Median seconds of a fit on memory-mapped float16 vectors (an on-disk index's) of n images, 5 captions each."""
    import tempfile

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        images = np.lib.format.open_memmap(f"{tmp}/i.npy", "w+", np.float16, (n_images, dim))
        texts = np.lib.format.open_memmap(f"{tmp}/c.npy", "w+", np.float16, (n_images * per_image, dim))
        for lo in range(0, n_images, 10_000):
            x = rng.normal(size=(min(10_000, n_images - lo), dim)).astype(np.float32)
            images[lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
            c = np.repeat(x / np.linalg.norm(x, axis=1, keepdims=True), per_image, 0)
            c += rng.normal(0, 0.05, c.shape).astype(np.float32)
            texts[lo * per_image:(lo + len(x)) * per_image] = c / np.linalg.norm(c, axis=1, keepdims=True)
        images.flush(), texts.flush()
        images, texts = np.load(f"{tmp}/i.npy", mmap_mode="r"), np.load(f"{tmp}/c.npy", mmap_mode="r")
        owners = np.repeat(np.arange(n_images), per_image)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cal = fit_calibration(images, texts, owners)
            times.append(time.perf_counter() - start)
        del images, texts
    return sorted(times)[len(times) // 2], cal


def at_level(rows: list[dict], level: float) -> dict:
    return next(row for row in rows if abs(row["level"] - level) < 1e-12)


def _table(found: dict, target: float) -> str:
    """One language's held-out rows and the worst absent colour / shape per level; `found` as measure's."""
    absent = found["absent"]
    lines = ["level  min score  held-out: recall  precision  predicted  hits/query   empty: worst colour  worst shape"]
    for i, r in enumerate(found["held_out"]):
        worst = {what: min(rows[i]["empty"] for key, rows in absent.items() if key.startswith(what))
                 for what in ("colour", "shape")}
        lines.append(f"{r['level']:5.2f}  {r['min_score']:9.3f}  {r['recall']:16.3f}  {r['precision']:9.3f}  "
                     f"{r['predicted']:9.3f}  {r['kept']:10.2f}  {worst['colour']:19.3f}  {worst['shape']:11.3f}"
                     + ("  ← auto" if abs(r["level"] - target) < 1e-12 else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, default=Path("demo_data"))
    parser.add_argument("--queries", type=int, default=200, help="queries per absent colour or shape")
    parser.add_argument("--scale", type=int, default=0, help="also time a fit on this many synthetic images")
    args = parser.parse_args(argv)
    from demo import SCALES, prepare_demo

    result = prepare_demo(args.demo_dir, SCALES["full"])
    found = measure_index(result.index, args.queries)
    cal, target = found["calibration"], DEFAULT_PRECISION_TARGET
    print(f"demo index {result.index}: {cal.summary()}")
    print(f"fit: {found['fit_seconds']:.2f} s; fitted on {cal.fitted_on['kinds']}; the same as the index's stored "
          f"calibration (fitted by its build): {'yes' if found['same_as_index'] else 'NO'}")
    names = dict(LANGUAGES)
    for code, part in found["by_language"].items():
        example = absent_queries("colour", "purple", 2, language=code)
        print(f"\ntext→image, {names[code]}. Held-out captions: {FOLDS} folds, {HELD_OUT} of each image's 5 "
              f"{names[code]} captions held out, fitted on all the others. Absent: {args.queries} {names[code]} "
              f"queries per colour/shape, e.g. {example}, on the index without that colour/shape, fitted on it:")
        print(_table(part, target))
        print(f"\nempty share per absent colour/shape, {names[code]} queries (images in the collection without it) at "
              f"levels 0.02 / {target:g} (auto) / 0.1 / 0.3:")
        for key, rows in part["absent"].items():
            shares = " / ".join(f"{at_level(rows, level)['empty']:.3f}" for level in (0.02, target, 0.1, 0.3))
            print(f"  {key:16} ({rows[0]['images']:4d} images)  {shares}")
    records = found["records"]
    print(f"\nrecords, fitted on all captions (not the issue's check): recall of captions reworded in templates the "
          f"demo never writes (e.g. {found['examples']['reworded']!r}); empty share of queries with words the model "
          f"never saw (e.g. {found['examples']['unknown'][0]!r}):")
    for level in (0.02, target, 0.1, 0.3):
        print(f"  {level:.2f}: reworded recall {at_level(records['reworded'], level)['recall']:.3f}; unknown words "
              f"empty: colour {at_level(records['unknown colour'], level)['empty']:.3f}, shape "
              f"{at_level(records['unknown shape'], level)['empty']:.3f}")
    if args.scale:
        seconds, big = fit_time(args.scale)
        print(f"\nfit on {args.scale} synthetic images / {5 * args.scale} captions (float16, memory-mapped): "
              f"median {seconds:.2f} s of 3; {big.fitted_on['sampled_images']} images sampled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
