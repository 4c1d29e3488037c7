import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from indexer import finetune
from indexer.cli import main as indexer_main
from indexer.readers import read_dataset
from search.cli import main as search_main
from search.errors import DatasetError
from search.encoders import EncoderSpec, create_encoder
from search.openclip.local_dir import init_local_dir
from search.openclip.training import ClipTask

from .helpers import TINY_MODEL_CFG, make_pairs, write_flickr8k, write_images

PAIRS = make_pairs(64, seed=11)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    write_images(root / "images", PAIRS)
    token = write_flickr8k(root / "text", PAIRS, ["train"] * 64)
    config = root / "tiny.json"
    config.write_text(json.dumps({"model_cfg": TINY_MODEL_CFG}))
    return root, token, config


def finetune_args(data, out, *extra):
    root, token, config = data
    return ["finetune", "--format", "flickr8k", "--annotations", str(token), "--images", str(root / "images"),
            "--split", "train", "--out", str(out), "--model", str(config), "--pretrained", "none",
            "--batch-size", "16", "--lr", "2e-3", "--workers", "0", "--quiet", *extra]


def state(folder):
    return create_encoder(EncoderSpec.from_args(f"local-dir:{folder}", None), "torch").model.state_dict()


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_lowers_loss_and_lifts_recall_from_chance(data, tmp_path, capsys):
    root, token, _ = data
    out = tmp_path / "model"
    assert indexer_main(finetune_args(data, out, "--val-split", "train", "--epochs", "40")) == 0
    assert f"use it with: --model local-dir:{out}" in capsys.readouterr().out
    run = json.loads((out / "training.json").read_text())
    losses = [r["loss"] for r in run["history"]]
    assert len(losses) == 40 and losses[-1] < 0.6 * losses[0]
    assert all(r["pairs_per_second"] > 0 for r in run["history"])
    # recall of the untrained model on the same split is near chance (R@5 = 5/64 ≈ 8%); trained, far above
    samples = read_dataset("flickr8k", token, root / "images", "train")
    untrained = create_encoder(EncoderSpec.from_args(f"local-dir:{out / '.resume' / 'init'}", None))
    before = finetune.validate(untrained, samples, root / "images")
    best = next(r for r in run["history"] if r["epoch"] == run["best_epoch"])["val"]
    assert before["text_to_image"]["R@5"] < 25
    assert best["text_to_image"]["R@5"] >= 50 and best["image_to_text"]["R@5"] >= 50

    # the saved folder loads through `indexer build`, and `search eval` reproduces the validation recall exactly
    index = tmp_path / "index"
    assert indexer_main(["build", "--format", "flickr8k", "--annotations", str(token), "--images",
                         str(root / "images"), "--split", "train", "--out", str(index), "--model",
                         f"local-dir:{out}", "--quiet"]) == 0
    capsys.readouterr()
    assert search_main(["eval", "--index", str(index), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for direction in ("text_to_image", "image_to_text"):
        for k in ("R@1", "R@5", "R@10"):
            assert metrics[direction][k] == pytest.approx(best[direction][k], abs=1e-6)


def test_interrupted_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch, capsys):
    assert indexer_main(finetune_args(data, tmp_path / "straight", "--epochs", "3")) == 0
    calls = {"n": 0}
    real_step = finetune.Trainer.step

    def interrupted_step(self, pixels, tokens):
        calls["n"] += 1
        if calls["n"] == 6:  # in epoch 2 (four steps an epoch): like Ctrl-C mid-epoch
            raise KeyboardInterrupt
        return real_step(self, pixels, tokens)

    monkeypatch.setattr(finetune.Trainer, "step", interrupted_step)
    assert indexer_main(finetune_args(data, tmp_path / "resumed", "--epochs", "3")) == 130
    assert json.loads((tmp_path / "resumed" / "training.json").read_text())["history"][-1]["epoch"] == 1
    monkeypatch.setattr(finetune.Trainer, "step", real_step)
    capsys.readouterr()
    assert indexer_main(finetune_args(data, tmp_path / "resumed", "--epochs", "3", "--resume")) == 0
    run = json.loads((tmp_path / "resumed" / "training.json").read_text())
    assert [r["epoch"] for r in run["history"]] == [1, 2, 3]
    straight, resumed = state(tmp_path / "straight"), state(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    # a finished run resumed again does nothing more; without --resume the folder is protected
    assert indexer_main(finetune_args(data, tmp_path / "resumed", "--epochs", "3", "--resume")) == 0
    assert indexer_main(finetune_args(data, tmp_path / "resumed", "--epochs", "3")) == 1
    assert "pass --resume to continue its run or --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("flag, frozen, trained", [("--lock-image", "visual.", "transformer."),
                                                   ("--lock-text", "transformer.", "visual.")])
def test_locked_towers_keep_their_weights(data, tmp_path, flag, frozen, trained):
    out = tmp_path / "model"
    assert indexer_main(finetune_args(data, out, "--epochs", "2", flag)) == 0
    before, after = state(out / ".resume" / "init"), state(out)
    frozen_names = [n for n in before if n.startswith(frozen)]
    trained_names = [n for n in before if n.startswith(trained)]
    assert frozen_names and trained_names
    assert all(torch.equal(before[n], after[n]) for n in frozen_names)
    assert any(not torch.equal(before[n], after[n]) for n in trained_names)


def test_accumulated_steps_match_one_big_batch(data, tmp_path):
    """With cached features, 4 micro-batches give the gradient of the full batch (same negatives, temperature once)."""
    root, token, _ = data
    folder = init_local_dir(TINY_MODEL_CFG, tmp_path / "init", seed=3)
    samples = read_dataset("flickr8k", token, root / "images", "train")
    grads = {}
    for accum in (1, 4):
        task = ClipTask.load(EncoderSpec.from_args(f"local-dir:{folder}", None))
        encoder = task.encoder
        config = finetune.FinetuneConfig(epochs=1, batch_size=32, accum_steps=accum, lr=1e-3, workers=0,
                                         progress=False)
        trainer = finetune.Trainer(task, samples, None, root / "images", tmp_path / f"out{accum}", config, {}, True)
        torch.manual_seed(0)
        pixels, tokens = trainer.dataset.collate([trainer.dataset[i] for i in range(32)])
        trainer.step(pixels, tokens)
        grads[accum] = {n: p.grad.clone() for n, p in encoder.model.named_parameters() if p.grad is not None}
    assert grads[1].keys() == grads[4].keys() and "logit_scale" in grads[1]
    for name in grads[1]:
        torch.testing.assert_close(grads[4][name], grads[1][name], rtol=1e-3, atol=1e-6)


def test_bad_input_is_one_line(data, tmp_path, capsys):
    root, token, config = data
    cases = [
        (finetune_args(data, tmp_path / "a", "--split", "test"), "no images listed in split 'test'"),
        (finetune_args(data, tmp_path / "b")[:6] + [str(tmp_path)] + finetune_args(data, tmp_path / "b")[7:],
         "has no captioned images that exist"),
        (finetune_args(data, tmp_path / "c", "--lock-image", "--lock-text"), "both towers are locked"),
        (finetune_args(data, tmp_path / "d", "--batch-size", "500"), "fewer than one batch of 500"),
        (finetune_args(data, tmp_path / "e", "--resume"), "nothing to resume"),
    ]
    for argv, message in cases:
        assert indexer_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    bad_model = finetune_args(data, tmp_path / "f")
    bad_model[bad_model.index("--model") + 1] = f"local-dir:{tmp_path / 'nowhere'}"
    assert indexer_main(bad_model) == 1
    assert "has no open_clip_config.json" in capsys.readouterr().err


def test_starts_from_existing_weights_with_a_gentle_default_lr(data, tmp_path, tiny_model_dir):
    args = finetune_args(data, tmp_path / "model", "--epochs", "1")
    args[args.index("--model") + 1] = f"local-dir:{tiny_model_dir}"
    args[args.index("--pretrained"):args.index("--pretrained") + 2] = []
    args[args.index("--lr"):args.index("--lr") + 2] = []
    assert indexer_main(args) == 0
    run = json.loads((tmp_path / "model" / "training.json").read_text())
    assert run["from_random"] is False and run["config"]["lr"] == 1e-5
    assert run["base_model"]["model"] == f"local-dir:{tiny_model_dir}"
    assert state(tmp_path / "model").keys() == state(tiny_model_dir).keys()


def test_step_budget_stops_at_exactly_n_steps_and_ends_the_schedule_there(data, tmp_path):
    out = tmp_path / "model"
    assert indexer_main(finetune_args(data, out, "--epochs", "3", "--max-steps", "6")) == 0
    run = json.loads((out / "training.json").read_text())
    assert run["steps"] == run["planned_steps"] == 6
    assert [(r["epoch"], r["steps"]) for r in run["history"]] == [(1, 4), (2, 2)]  # four steps an epoch
    assert run["history"][0]["lr"] > 0 and run["history"][-1]["lr"] == 0.0  # the cosine reached its end at step 6
    assert run["config"]["max_steps"] == 6 and "max_minutes" not in run["config"]
    # without --max-steps, every step of every epoch
    assert indexer_main(finetune_args(data, tmp_path / "epochs", "--epochs", "2")) == 0
    run = json.loads((tmp_path / "epochs" / "training.json").read_text())
    assert run["steps"] == run["planned_steps"] == 8 and [r["steps"] for r in run["history"]] == [4, 4]
    assert indexer_main(finetune_args(data, tmp_path / "zero", "--max-steps", "0")) == 1


def test_same_arguments_train_the_same_weights_however_slow_the_machine(data, tmp_path, monkeypatch):
    """The budget is steps, not time: a run whose clock jumps an hour at every reading trains the same model."""
    args = ("--epochs", "2")
    assert indexer_main(finetune_args(data, tmp_path / "a", *args)) == 0
    hours = iter(range(0, 10 ** 9, 3600))
    monkeypatch.setattr(finetune, "time", SimpleNamespace(perf_counter=lambda: float(next(hours))))
    assert indexer_main(finetune_args(data, tmp_path / "b", *args)) == 0
    runs = [json.loads((tmp_path / name / "training.json").read_text()) for name in ("a", "b")]
    assert runs[1]["history"][-1]["elapsed_seconds"] > 3600  # the slow clock was read
    assert [r["loss"] for r in runs[0]["history"]] == [r["loss"] for r in runs[1]["history"]]
    assert runs[0]["steps"] == runs[1]["steps"] == 8
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_failed_overwrite_keeps_the_old_model_and_resumes_into_place(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    assert indexer_main(finetune_args(data, out, "--epochs", "1")) == 0
    before, old = files(out), state(out)
    calls = {"n": 0}
    real_step = finetune.Trainer.step

    def failing_step(self, pixels, tokens):
        calls["n"] += 1
        if calls["n"] == 6:  # in epoch 2, after the first epoch's checkpoint
            raise DatasetError("an image became unreadable")
        return real_step(self, pixels, tokens)

    monkeypatch.setattr(finetune.Trainer, "step", failing_step)
    assert indexer_main(finetune_args(data, out, "--epochs", "3", "--overwrite")) == 1
    assert "an image became unreadable" in capsys.readouterr().err
    assert files(out) == before  # byte for byte: weights, training.json, resumable state
    after = state(out)
    assert all(torch.equal(after[n], old[n]) for n in old)
    assert (finetune.work_dir(out) / ".resume" / "state.pt").is_file()

    # --resume continues the replacement beside the old model and swaps it in when complete
    monkeypatch.setattr(finetune.Trainer, "step", real_step)
    assert indexer_main(finetune_args(data, out, "--epochs", "3", "--resume")) == 0
    assert not finetune.work_dir(out).exists()
    run = json.loads((out / "training.json").read_text())
    assert [r["epoch"] for r in run["history"]] == [1, 2, 3] and run["steps"] == 12
    assert run["base_model"]["model"] == finetune.OWN_INIT  # the init weights moved with the folder
    assert (out / ".resume" / "init" / "open_clip_config.json").is_file()
    new = state(out)
    assert any(not torch.equal(new[n], old[n]) for n in old)
    # a finished model resumed again does nothing; a plain --overwrite replaces it with a new run
    assert indexer_main(finetune_args(data, out, "--epochs", "3", "--resume")) == 0
    assert indexer_main(finetune_args(data, out, "--epochs", "1", "--overwrite")) == 0
    assert json.loads((out / "training.json").read_text())["steps"] == 4 and not finetune.work_dir(out).exists()


@pytest.mark.slow
def test_killed_overwrite_leaves_the_old_model_loadable(data, tmp_path):
    """The user's way: `python -m indexer finetune --overwrite` from another directory, relative paths, kill -9."""
    out = tmp_path / "model"
    assert indexer_main(finetune_args(data, out, "--epochs", "1")) == 0
    before, old = files(out), state(out)
    argv = [sys.executable, "-m", "indexer", *finetune_args(data, Path("model"), "--epochs", "1000", "--overwrite")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / ".model.training" / "training.json"
    try:
        for _ in range(1200):  # until the new run has checkpointed an epoch beside the old model
            if checkpoint.is_file() or process.poll() is not None:
                break
            time.sleep(0.25)
    finally:
        process.kill()
        process.wait()
    assert checkpoint.is_file(), process.stderr.read().decode()
    process.stderr.close()
    assert files(out) == before
    after = state(out)
    assert all(torch.equal(after[n], old[n]) for n in old)


def test_on_epoch_sees_each_checkpointed_epoch_and_leaves_the_training_unchanged(data, tmp_path):
    """What benchmarks/finetune.py does: test recall after every epoch, through `fit(on_epoch=...)`."""
    root, token, _ = data
    folder = init_local_dir(TINY_MODEL_CFG, tmp_path / "init", seed=3)
    samples = read_dataset("flickr8k", token, root / "images", "train")
    config = finetune.FinetuneConfig(epochs=3, max_steps=6, batch_size=16, lr=2e-3, workers=0, progress=False)
    weights, seen = {}, []
    for name in ("plain", "observed"):
        task = ClipTask.load(EncoderSpec.from_args(f"local-dir:{folder}", None))
        trainer = finetune.Trainer(task, samples, None, root / "images", tmp_path / name, config, {}, True)

        def measure(record, task=task, out=tmp_path / name):
            saved = json.loads((out / "training.json").read_text())["history"][-1]
            seen.append((record["epoch"], record["steps"], saved == record, task.encoder.model.training,
                         set(finetune.validate(task.encoder, samples, root / "images")) >= {"text_to_image"}))

        trainer.fit(on_epoch=measure if name == "observed" else None)
        weights[name] = task.state_dict()
    assert seen == [(1, 4, True, False, True), (2, 2, True, False, True)]  # the last, partial epoch too
    for key in weights["plain"]:
        torch.testing.assert_close(weights["observed"][key], weights["plain"][key], rtol=0, atol=1e-6)
