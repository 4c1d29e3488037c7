import hashlib
import json
import logging
import random
import re

import pytest
import torch

from demo import SCALES, prepare
from demo.scenes import IMAGE_DIR, captions, captions_zh, generate, random_scene, twin
from indexer import finetune
from indexer.readers import read_dataset
from search.encoders import EncoderSpec, create_encoder
from search.errors import DatasetError
from search.query_features import caption_language
from web.__main__ import main as web_main


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_generator_is_deterministic_and_in_flickr8k_layout(tmp_path):
    token = generate(tmp_path / "a", n_train=40, n_val=10, n_test=20, seed=4)
    generate(tmp_path / "b", n_train=40, n_val=10, n_test=20, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate(tmp_path / "c", n_train=40, n_val=10, n_test=20, seed=5)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    images = tmp_path / "a" / IMAGE_DIR
    splits = {s: read_dataset("flickr8k", token, images, s) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [40, 10, 20]
    assert all(len(s.captions) == 10 and len(set(s.captions)) == 10 for v in splits.values() for s in v)
    assert all(caption_language(c) == ("en" if i < 5 else "zh")  # five English, then five Chinese captions
               for v in splits.values() for s in v for i, c in enumerate(s.captions))
    test_captions = {c for s in splits["test"] for c in s.captions}
    assert not test_captions & {c for s in splits["train"] for c in s.captions}  # never seen in training
    assert not {s.image for s in splits["test"]} & {s.image for s in splits["train"]}
    # English alone: the same images and English captions (the Chinese ones come from a stream of their own)
    generate(tmp_path / "en", n_train=40, n_val=10, n_test=20, seed=4, languages=("en",))
    english = read_dataset("flickr8k", tmp_path / "en" / "Flickr8k.token.txt", tmp_path / "en" / IMAGE_DIR)
    assert [(s.image, s.captions, s.split) for s in english] == [
        (s.image, s.captions[:5], s.split) for v in splits.values() for s in v]
    assert _digest(tmp_path / "en" / IMAGE_DIR) == _digest(images)
    with pytest.raises(DatasetError, match="caption languages"):
        generate(tmp_path / "fr", n_train=4, n_val=1, n_test=1, languages=("fr",))


def test_captions_name_every_factor_and_twins_differ_in_one():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        for caption in captions(scene, rng):
            for group in scene.groups:
                assert group.colour in caption and group.shape in caption
            if scene.layout == "left-right":
                assert "left" in caption or "right" in caption
        other = twin(scene, rng)
        assert other != scene and other.layout == scene.layout
        changed = sum(a != b for a, b in zip(scene.groups, other.groups))
        swapped = len(scene.groups) == 2 and other.groups == scene.groups[::-1]
        assert changed == 1 or swapped


# The test's own reading of both grammars (not the generator's tables): words → facts
EN_COLOURS = "red green blue yellow purple orange white black".split()
ZH_COLOURS = dict(zip("红色 绿色 蓝色 黄色 紫色 橙色 白色 黑色".split(), EN_COLOURS))
ZH_SHAPES = {"圆": "circle", "方块": "square", "三角形": "triangle", "菱形": "diamond", "十字": "cross"}
ZH_COUNTS = {"一": 1, "两": 2, "三": 3, "1": 1, "2": 2, "3": 3}
EN_COUNTS = {"a": 1, "one": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}
ZH_SIZES = {"小": "small", "大": "large"}
ZH_SIDES = {"左边": "left", "右边": "right", "上面": "top", "下面": "bottom"}
ZH_BACKGROUNDS = {"灰色": "grey", "沙色": "sand", "青灰色": "slate"}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
EN_RELATIONS = {"to the left of": "left", "to the right of": "right", "above": "top", "below": "bottom"}
GRAMMARS = {
    "en": dict(group=re.compile(rf"\b(?P<count>{'|'.join(EN_COUNTS)}) (?:(?P<size>small|large) )?"
                                rf"(?P<colour>{'|'.join(EN_COLOURS)}) "
                                r"(?P<shape>circle|square|triangle|diamond|cross)(?:es|s)?\b"),
               counts=EN_COUNTS, colours=dict(zip(EN_COLOURS, EN_COLOURS)), shapes=None, sizes=None,
               side_after=re.compile(r" on the (left|right|top|bottom)\b"), sides=None,
               side_before=re.compile(r"\b(left|right|top|bottom): $"),
               relation=re.compile(rf" ({'|'.join(EN_RELATIONS)}) $"), relations=EN_RELATIONS,
               background=re.compile(r"\b(grey|sand|slate) (?:background|image|picture)\b"), backgrounds=None),
    "zh": dict(group=re.compile(rf"(?P<count>[一两三123])个(?P<colour>{'|'.join(ZH_COLOURS)})的(?P<size>[小大])?"
                                rf"(?P<shape>{'|'.join(ZH_SHAPES)})"),
               counts=ZH_COUNTS, colours=ZH_COLOURS, shapes=ZH_SHAPES, sizes=ZH_SIZES,
               side_after=re.compile(rf"在({'|'.join(ZH_SIDES)})"), sides=ZH_SIDES,
               side_before=re.compile(rf"({'|'.join(ZH_SIDES)})：$"),
               relation=re.compile(r"在$"), relations=None,
               background=re.compile(r"(青灰色|(?<!青)灰色|沙色)(?:背景|图片|的图片)"), backgrounds=ZH_BACKGROUNDS),
}


def _read_caption(text: str, language: str) -> tuple[dict, str | None]:
    """{(count, colour, shape): (size or None, side or None)} and the background named, if any."""
    g = GRAMMARS[language]
    found = list(g["group"].finditer(text))
    facts, sides = {}, [None] * len(found)
    for i, match in enumerate(found):
        after, before = text[match.end():], text[:match.start()]
        if g["side_after"].match(after):
            side = g["side_after"].match(after).group(1)
            sides[i] = g["sides"][side] if g["sides"] else side
        elif g["side_before"].search(before):
            side = g["side_before"].search(before).group(1)
            sides[i] = g["sides"][side] if g["sides"] else side
        if i + 1 < len(found):  # "A to the left of B" / "A在B的左边": A's side, and B's the opposite
            between = text[match.end():found[i + 1].start()]
            if language == "en" and g["relation"].fullmatch(" " + between.strip() + " "):
                sides[i] = g["relations"][between.strip()]
                sides[i + 1] = OPPOSITE[sides[i]]
            elif language == "zh" and between == "在":
                side = re.match(rf"的({'|'.join(ZH_SIDES)})", text[found[i + 1].end():])
                sides[i] = ZH_SIDES[side.group(1)]
                sides[i + 1] = OPPOSITE[sides[i]]
    for match, side in zip(found, sides):
        count, size, colour, shape = match.group("count", "size", "colour", "shape")
        key = (g["counts"][count], g["colours"][colour], g["shapes"][shape] if g["shapes"] else shape)
        facts[key] = ((g["sizes"][size] if g["sizes"] else size) if size else None, side)
    background = g["background"].search(text)
    if background is None:
        return facts, None
    return facts, g["backgrounds"][background.group(1)] if g["backgrounds"] else background.group(1)


def _scene_facts(lines: list[str], language: str) -> tuple[dict, set]:
    """Over a scene's captions in one language: per group, the sizes and sides named; the backgrounds named."""
    merged, backgrounds = {}, set()
    for line in lines:
        facts, background = _read_caption(line, language)
        for key, (size, side) in facts.items():
            sizes, sides = merged.setdefault(key, (set(), set()))
            sizes.update({size} - {None})
            sides.update({side} - {None})
        backgrounds.update({background} - {None})
    return merged, backgrounds


def test_chinese_captions_name_the_same_facts_as_the_english_ones():
    rng = random.Random(3)
    for _ in range(300):
        scene = random_scene(rng)
        english, chinese = captions(scene, rng), captions_zh(scene, rng)
        assert len(chinese) == len(set(chinese)) == 5 and all(caption_language(c) == "zh" for c in chinese)
        truth = {(g.count, g.colour, g.shape): g for g in scene.groups}
        sides = (dict(zip(truth, ("left", "right") if scene.layout == "left-right" else ("top", "bottom")))
                 if scene.layout != "centre" else {})
        for line in chinese:  # every Chinese caption names every group's number, colour, shape and side
            facts, _ = _read_caption(line, "zh")
            assert set(facts) == set(truth), line
            for key, (size, side) in facts.items():
                assert size in (None, truth[key].size) and side == sides.get(key), line
        zh = _scene_facts(chinese, "zh")
        assert zh == _scene_facts(english, "en")  # sizes, sides and background: the same facts in both
        assert zh[1] == {scene.background}
        assert all(sizes == {truth[key].size} and side == ({sides[key]} if sides else set())
                   for key, (sizes, side) in zh[0].items())


def test_the_brief_example_reads_as_its_english():
    assert _read_caption("两个红色的小圆在左边，一个蓝色的大方块在右边", "zh") == _read_caption(
        "two small red circles on the left and one large blue square on the right", "en")


def _weights(folder):
    return create_encoder(EncoderSpec.from_args(f"local-dir:{folder}", None), "torch").model.state_dict()


REAL_FIT = finetune.Trainer.fit


def _count_fits(monkeypatch):
    calls = []

    def counted(self):
        calls.append(self.out)
        return REAL_FIT(self)

    monkeypatch.setattr(finetune.Trainer, "fit", counted)
    return calls


def test_demo_flow_runs_then_reuses_everything(tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO, logger="demo")
    root, tiny = tmp_path / "demo", SCALES["tiny"]
    argv = ["--demo", "--demo-dir", str(root), "--demo-scale", "tiny", "--prepare-only"]
    assert web_main(argv) == 0
    out = capsys.readouterr().out
    assert "Recall on the held-out test split" in out and "text→image" in out
    recall = json.loads((root / "recall.json").read_text())
    assert recall["n_images"] == tiny.n_test and recall["n_captions"] == 10 * tiny.n_test
    # five English and five Chinese captions an image: recall per language, printed side by side
    languages = recall["languages"]
    assert {code: item["n_captions"] for code, item in languages.items()} == {"en": 5 * tiny.n_test,
                                                                              "zh": 5 * tiny.n_test}
    en, zh = (languages[code]["text_to_image"] for code in ("en", "zh"))
    assert (f"text→image by caption language: English R@1/5/10 {en['R@1']:.2f}/{en['R@5']:.2f}/{en['R@10']:.2f}, "
            f"Chinese R@1/5/10 {zh['R@1']:.2f}/{zh['R@5']:.2f}/{zh['R@10']:.2f}\n") in out
    zh_r1 = f"text→image R@1 en {languages['en']['text_to_image']['R@1']:.2f}, zh " \
            f"{languages['zh']['text_to_image']['R@1']:.2f})"
    assert zh_r1 in out
    assert (root / "model" / "open_clip_model.safetensors").is_file()
    assert not (root / "model" / ".resume" / "state.pt").exists()
    run = json.loads((root / "model" / "training.json").read_text())
    planned = tiny.n_train // tiny.batch_size * tiny.epochs
    assert run["steps"] == run["planned_steps"] == planned and run["recipe"] == tiny.model_recipe()
    r1 = f"test recall text→image R@1 {recall['text_to_image']['R@1']:.2f}"
    assert f"model: trained {root / 'model'} in this run ({tiny.epochs} epochs, {planned} steps; {r1}" in out
    before = (root / "index" / "manifest.json").read_text()
    (root / "index" / "marker").touch()  # gone if the index is rebuilt (swapped in whole)

    def no_training(self):
        raise AssertionError("the second run must reuse the trained model")

    monkeypatch.setattr(finetune.Trainer, "fit", no_training)
    assert web_main(argv) == 0
    out = capsys.readouterr().out
    assert f"model: reusing {root / 'model'} (trained {tiny.epochs} epochs, {planned} steps; {r1}" in out
    assert out.rstrip().endswith("--retrain to train again")
    assert (root / "index" / "manifest.json").read_text() == before and (root / "index" / "marker").exists()

    # --retrain trains again, to the same weights (steps, not time), and rebuilds the index from them
    first = _weights(root / "model")
    fits = _count_fits(monkeypatch)
    assert web_main(argv + ["--retrain"]) == 0
    assert len(fits) == 1 and "model: trained" in capsys.readouterr().out
    assert not (root / "index" / "marker").exists()
    second = _weights(root / "model")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-6)
    assert not finetune.work_dir(root / "model").exists()


@pytest.mark.slow
def test_demo_retrains_a_model_made_by_another_recipe_and_rebuilds_a_stale_index(tmp_path, monkeypatch, capsys,
                                                                                    caplog):
    caplog.set_level(logging.INFO, logger="demo")
    root = tmp_path / "demo"
    argv = ["--demo", "--demo-dir", str(root), "--demo-scale", "tiny", "--prepare-only"]
    assert web_main(argv) == 0
    # an index built from other weights is rebuilt, the model kept
    manifest = json.loads((root / "index" / "manifest.json").read_text())
    (root / "index" / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 16}))
    fits = _count_fits(monkeypatch)
    assert web_main(argv) == 0
    assert fits == [] and "was built from other weights" in caplog.text
    assert json.loads((root / "index" / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    # a model from the clock-limited demo (no recipe recorded) is trained again, not reused silently
    run_file = root / "model" / "training.json"
    run = json.loads(run_file.read_text())
    del run["recipe"]
    run_file.write_text(json.dumps({**run, "config": {**run["config"], "max_minutes": 9.5}}))
    caplog.clear()
    assert web_main(argv) == 0
    assert len(fits) == 1 and "earlier version of the demo" in caplog.text
    assert "model: trained" in capsys.readouterr().out
    assert json.loads(run_file.read_text())["recipe"] == SCALES["tiny"].model_recipe()


def test_why_a_model_is_trained_again():
    recipe = SCALES["tiny"].model_recipe()
    done = {"recipe": recipe, "steps": 4, "planned_steps": 4}
    assert prepare._why_train(done, recipe) is None
    assert prepare._why_train(None, recipe) == "no trained model yet"
    assert "stopped after 2 of 4 steps" in prepare._why_train({**done, "steps": 2}, recipe)
    full = SCALES["full"].model_recipe()
    reason = prepare._why_train(done, full)
    assert "recipe.finetune.epochs" in reason and "recipe.scenes.n_train" in reason
    assert "recipe.model_cfg" not in reason  # the same architecture at both scales


def test_web_without_index_or_demo_is_an_error(capsys):
    assert web_main([]) == 1
    assert "give --index INDEX, or --demo" in capsys.readouterr().err
