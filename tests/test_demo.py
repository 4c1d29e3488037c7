import hashlib
import json
import logging
import random

import pytest
import torch

from demo import SCALES, prepare
from demo.scenes import IMAGE_DIR, captions, generate, random_scene, twin
from indexer import finetune
from indexer.readers import read_dataset
from search.encoders import EncoderSpec, create_encoder
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
    assert all(len(s.captions) == 5 and len(set(s.captions)) == 5 for v in splits.values() for s in v)
    test_captions = {c for s in splits["test"] for c in s.captions}
    assert not test_captions & {c for s in splits["train"] for c in s.captions}  # never seen in training
    assert not {s.image for s in splits["test"]} & {s.image for s in splits["train"]}


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
    assert recall["n_images"] == tiny.n_test and recall["n_captions"] == 5 * tiny.n_test
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
