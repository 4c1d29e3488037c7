import hashlib
import json
import random

from indexer import finetune
from indexer.readers import read_dataset
from indexer.scenes import IMAGE_DIR, captions, generate, random_scene, twin
from web.__main__ import main as web_main
from web.demo import SCALES


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


def test_demo_flow_runs_then_reuses_everything(tmp_path, monkeypatch, capsys):
    argv = ["--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-scale", "tiny", "--prepare-only"]
    assert web_main(argv) == 0
    out = capsys.readouterr().out
    assert "Recall on the held-out test split" in out and "text→image" in out
    recall = json.loads((tmp_path / "demo" / "recall.json").read_text())
    assert recall["n_images"] == SCALES["tiny"].n_test and recall["n_captions"] == 5 * SCALES["tiny"].n_test
    assert (tmp_path / "demo" / "model" / "open_clip_model.safetensors").is_file()
    assert not (tmp_path / "demo" / "model" / ".resume" / "state.pt").exists()
    before = (tmp_path / "demo" / "index" / "manifest.json").read_text()

    def no_training(self):
        raise AssertionError("the second run must reuse the trained model")

    monkeypatch.setattr(finetune.Trainer, "fit", no_training)
    assert web_main(argv) == 0
    assert (tmp_path / "demo" / "index" / "manifest.json").read_text() == before


def test_web_without_index_or_demo_is_an_error(capsys):
    assert web_main([]) == 1
    assert "give --index INDEX, or --demo" in capsys.readouterr().err
