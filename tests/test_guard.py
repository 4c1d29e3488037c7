"""Fine-tuning with a guard set (indexer finetune --guard-*) and WiSE-FT interpolation (--interpolate)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer import finetune, guard
from indexer.cli import main as indexer_main
from indexer.readers import read_dataset
from search.encoders import EncoderSpec, create_encoder
from search.images import load_image
from search.openclip.training import ClipTask

from .helpers import make_pairs, reference_recall, write_flickr8k, write_images

ROOT = Path(__file__).resolve().parents[1]
GUARD_PAIRS = make_pairs(50, seed=1)  # the pairs conftest's trained_model_dir memorised: it does well on them
NONSENSE = ("zorp", "quix", "blet", "mave", "trun", "pelk", "sorn", "wib")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A guard set the starting model knows, and a tiny unrelated training set: 16 other images whose captions are
    nonsense words."""
    root = tmp_path_factory.mktemp("guard")
    write_images(root / "guard_images", GUARD_PAIRS)
    write_flickr8k(root / "guard_text", GUARD_PAIRS, ["test"] * len(GUARD_PAIRS))
    rng = random.Random(5)
    train = [(f"u_{i:02d}.png", tuple(" ".join(rng.choice(NONSENSE) for _ in range(3)) for _ in range(2)), look)
             for i, (_, _, look) in enumerate(make_pairs(16, seed=9))]
    write_images(root / "train_images", train)
    write_flickr8k(root / "train_text", train, ["train"] * len(train))
    return root


def args(data, model_dir, out, *extra, lr="1e-5", epochs="2"):
    return ["finetune", "--format", "flickr8k", "--annotations", str(data / "train_text" / "Flickr8k.token.txt"),
            "--images", str(data / "train_images"), "--split", "train", "--out", str(out),
            "--model", f"local-dir:{model_dir}", "--batch-size", "8", "--lr", lr, "--epochs", epochs,
            "--workers", "0", "--quiet", *extra]


def guard_args(data):
    return ["--guard-annotations", str(data / "guard_text" / "Flickr8k.token.txt"), "--guard-images",
            str(data / "guard_images"), "--guard-split", "test"]


def state(folder):
    return create_encoder(EncoderSpec.from_args(f"local-dir:{folder}", None), "torch").model.state_dict()


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_of(folder):
    return json.loads((folder / "training.json").read_text())


def without(metrics, *keys):
    return {k: v for k, v in metrics.items() if k not in keys}


def test_guard_refuses_a_finetune_that_destroys_general_recall(data, trained_model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert indexer_main(args(data, trained_model_dir, out, *guard_args(data), lr="5e-3")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: every epoch lost more than 2 points on the guard set")
    assert f"the original weights stay (in {out})" in err
    run = run_of(out)
    # the guard number before training, against an independent recall computation on the starting model's vectors
    encoder = create_encoder(EncoderSpec.from_args(f"local-dir:{trained_model_dir}", None), "torch")
    samples = read_dataset("flickr8k", data / "guard_text" / "Flickr8k.token.txt", data / "guard_images", "test")
    images = encoder.encode_images([load_image(data / "guard_images" / s.image) for s in samples])
    captions = encoder.encode_texts([c for s in samples for c in s.captions])
    truth = [i for i, s in enumerate(samples) for _ in s.captions]
    expected = [reference_recall(images, captions, truth, k, ties="position") for k in (1, 5, 10)]
    baseline = run["baseline"]["guard"]
    for k, (t2i, i2t) in zip((1, 5, 10), expected):
        assert baseline["text_to_image"][f"R@{k}"] == pytest.approx(t2i)
        assert baseline["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
    assert baseline["mean"] == pytest.approx(np.mean(expected)) and baseline["mean"] > 50
    assert run["guard"]["max_regression"] == 2.0 and run["guard"]["images"] == 50
    assert run["guard"]["source"]["annotations"] == str((data / "guard_text" / "Flickr8k.token.txt").resolve())
    assert [r["epoch"] for r in run["history"]] == [1, 2]
    for record in run["history"]:
        assert record["guard"]["regression"] == pytest.approx(baseline["mean"] - record["guard"]["mean"], abs=1e-5)
        assert record["guard"]["regression"] > 2 and record["guard"]["safe"] is False
    assert run["best_epoch"] is None and run["outcome"]["refused"] is True
    after, before = state(out), state(trained_model_dir)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_guard_keeps_a_gentle_finetune_and_plots_it(data, trained_model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert indexer_main(args(data, trained_model_dir, out, *guard_args(data), "--val-split", "train")) == 0
    printed = capsys.readouterr().out
    run = run_of(out)
    assert all(r["guard"]["safe"] and r["guard"]["regression"] <= 2 for r in run["history"])
    assert run["best_epoch"] in (1, 2) and run["outcome"]["refused"] is False
    assert f"epoch {run['best_epoch']} is within the guard bound" in printed
    assert run["baseline"]["epoch"] == 0 and set(run["baseline"]) == {"epoch", "val", "guard"}
    after, before = state(out), state(trained_model_dir)
    assert any(not torch.equal(after[n], before[n]) for n in before)  # trained, not the original kept
    plot = out / "training.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"recall per epoch: {plot}" in printed


def test_an_unsafe_best_epoch_gives_way_to_the_best_safe_one(data, trained_model_dir, tmp_path, monkeypatch):
    """Scripted guard losses 0.5, 3, 9 points: without validation the latest epoch would be kept; the guard keeps
    epoch 1, says so in one line, and the folder holds exactly epoch 1's weights."""
    losses = iter([0.5, 3.0, 9.0])
    real_measure = guard.Guard.measure

    def scripted(self, encoder, baseline):
        metrics = real_measure(self, encoder, baseline)
        if baseline is not None:
            metrics["regression"] = next(losses)
            metrics["safe"] = metrics["regression"] <= self.config.max_regression
        return metrics

    monkeypatch.setattr(guard.Guard, "measure", scripted)
    task = ClipTask.load(EncoderSpec.from_args(f"local-dir:{trained_model_dir}", None))
    samples = read_dataset("flickr8k", data / "train_text" / "Flickr8k.token.txt", data / "train_images", "train")
    guarded = guard.Guard(guard.GuardConfig(tuple(read_dataset("flickr8k", data / "guard_text" / "Flickr8k.token.txt",
                                                               data / "guard_images", "test")),
                                            data / "guard_images", {"guard": 1}), task)
    config = finetune.FinetuneConfig(epochs=3, batch_size=8, lr=1e-3, workers=0, progress=False)
    trainer = finetune.Trainer(task, samples, None, data / "train_images", tmp_path / "model", config, {}, False,
                               guard=guarded)
    weights = {}
    run = trainer.fit(on_epoch=lambda r: weights.setdefault(r["epoch"], {k: v.clone()
                                                                         for k, v in task.state_dict().items()}))
    assert [r["guard"]["safe"] for r in run["history"]] == [True, False, False]
    assert run["best_epoch"] == 1
    assert run["outcome"]["message"] == "epoch 3 lost 9.0 points on the guard set; keeping epoch 1"
    saved = state(tmp_path / "model")
    assert all(torch.equal(saved[n], weights[1][n]) for n in saved)
    assert any(not torch.equal(saved[n], weights[3][n]) for n in saved)


def test_interpolation_table_ends_at_the_original_and_the_finetuned_weights(data, trained_model_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "model"
    code = indexer_main(args(data, trained_model_dir, out, *guard_args(data), "--val-split", "train",
                             "--interpolate", "0.5,0.1", lr="5e-3"))
    captured = capsys.readouterr()
    run = run_of(out)
    table = run["interpolation"]["table"]
    assert [row["alpha"] for row in table] == [0.0, 0.1, 0.5, 1.0]
    # α=0 measures exactly the original model, α=1 exactly the epoch it interpolates towards
    assert table[0]["val"] == run["baseline"]["val"]
    assert without(table[0]["guard"], "regression", "safe") == run["baseline"]["guard"]
    assert table[0]["guard"]["regression"] == 0 and table[0]["guard"]["safe"]
    endpoint = next(r for r in run["history"] if r["epoch"] == run["interpolation"]["endpoint_epoch"])
    assert table[-1]["val"] == endpoint["val"] and table[-1]["guard"] == endpoint["guard"]
    # the kept α: the best validation recall among the safe ones; exit 1 only when that is the original alone
    safe = [row for row in table if row["guard"]["safe"]]
    chosen = run["interpolation"]["chosen_alpha"]
    score = {row["alpha"]: finetune.epoch_score(row, 0) for row in safe}
    assert chosen in score and score[chosen] == max(score.values())
    assert code == (1 if chosen == 0 else 0), captured.err
    # the folder holds (1-α)·original + α·finetuned, computed here independently
    original = state(trained_model_dir)
    finetuned = torch.load(out / ".resume" / guard.ENDPOINT_FILE, weights_only=True)
    saved = state(out)
    for name, value in original.items():
        torch.testing.assert_close(saved[name], (1 - chosen) * value + chosen * finetuned[name], rtol=1e-5, atol=1e-6)

    # through the training wrapper: α=0 gives the original model's vectors, α=1 the fine-tuned, 0.5 neither
    task = ClipTask.load(EncoderSpec.from_args(f"local-dir:{trained_model_dir}", None))
    task.eval()
    theta0 = {k: v.clone() for k, v in task.state_dict().items()}
    images = [load_image(data / "guard_images" / name) for name, _, _ in GUARD_PAIRS[:8]]
    texts = [captions[0] for _, captions, _ in GUARD_PAIRS[:8]]

    def vectors(alpha):
        task.load_state_dict(guard.interpolated(theta0, finetuned, alpha))
        return task.encoder.encode_images(images), task.encoder.encode_texts(texts)

    reference = create_encoder(EncoderSpec.from_args(f"local-dir:{trained_model_dir}", None), "torch")
    at0, at1, half = vectors(0.0), vectors(1.0), vectors(0.5)
    assert np.array_equal(at0[0], reference.encode_images(images))
    assert np.array_equal(at0[1], reference.encode_texts(texts))
    task.load_state_dict(finetuned)
    assert np.array_equal(at1[0], task.encoder.encode_images(images))
    assert not np.allclose(half[0], at0[0]) and not np.allclose(half[0], at1[0])


def test_refused_overwrite_keeps_the_previous_model(data, trained_model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert indexer_main(args(data, trained_model_dir, out, "--epochs", "1")) == 0
    before = files(out)
    capsys.readouterr()
    assert indexer_main(args(data, trained_model_dir, out, *guard_args(data), "--overwrite", lr="5e-3")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} keeps its previous model" in err
    assert files(out) == before


def test_resume_with_another_guard_bound_is_refused(data, trained_model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert indexer_main(args(data, trained_model_dir, out, *guard_args(data), epochs="1")) == 0
    capsys.readouterr()
    assert indexer_main(args(data, trained_model_dir, out, *guard_args(data), "--resume", "--max-regression", "5",
                             epochs="2")) == 1
    assert "another guard set or --max-regression" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--max-regression", "3"], "--max-regression needs a guard set"),
    (["--guard-split", "test"], "--guard-split needs a guard set"),
    (["--interpolate", "0.5"], "--interpolate needs --val-split or a guard set"),
    (["--interpolate", "0.5,1.5"], "each weight must lie between 0 and 1"),
    (["--interpolate", "half"], "is not a comma-separated list of numbers"),
    (["--guard-annotations", "nowhere.txt", "--guard-images", "."], "nowhere.txt"),
])
def test_bad_guard_arguments_are_one_line(data, trained_model_dir, tmp_path, capsys, extra, message):
    try:
        code = indexer_main(args(data, trained_model_dir, tmp_path / "model", *extra))
    except SystemExit as exc:  # argparse's errors (one line, status 1 by the project's parser)
        code = exc.code
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_the_cli_from_another_directory_with_relative_paths(data, trained_model_dir, tmp_path):
    """The user's way: `python -m indexer finetune ... --guard-dataset ...` run from the data folder."""
    model = os.path.relpath(trained_model_dir, data)
    out = Path(os.path.relpath(tmp_path / "model", data))
    argv = [sys.executable, "-m", "indexer", "finetune", "--format", "flickr8k", "--annotations",
            "train_text/Flickr8k.token.txt", "--images", "train_images", "--split", "train", "--val-split", "train",
            "--out", str(out), "--model", f"local-dir:{model}", "--batch-size", "8", "--lr", "1e-5", "--epochs", "1",
            "--workers", "0", "--quiet", "--guard-dataset", "guard_text/Flickr8k.token.txt", "--guard-images",
            "guard_images", "--guard-split", "test", "--max-regression", "1", "--interpolate", "0.5"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(argv, cwd=data, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"model saved to {out}") and lines[-1] == f"use it with: --model local-dir:{out}"
    assert sum(line.startswith("α=") for line in lines) == 3 and any("← kept" in line for line in lines)
    run = run_of(tmp_path / "model")
    assert run["guard"]["max_regression"] == 1.0
    assert run["guard"]["source"]["images"] == str((data / "guard_images").resolve())
    assert [row["alpha"] for row in run["interpolation"]["table"]] == [0.0, 0.5, 1.0]
    assert (tmp_path / "model" / "training.png").is_file()
