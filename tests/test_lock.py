"""One writer at a time: a second writer of the same index, model folder or demo folder is refused at once with one
line naming the first; a lock left by a killed process is free again; nobody deletes work a live writer holds.

The first writer is kept busy deterministically: it is stopped (SIGSTOP) once its lock file names it, or once its
work directory shows progress, and continued (SIGCONT) after the second one was refused."""
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.cli import main as indexer_main
from indexer.lock import WriterLock, lock_path
from search.errors import WriterBusyError
from web.__main__ import main as web_main

from .helpers import TINY_MODEL_CFG, make_pairs, write_flickr8k, write_images

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
HANG_GUARD_S = 180  # only against a hung test; nothing asserted on time
HOLD = "import sys, time; from indexer.lock import WriterLock; WriterLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(3600)"
TRY = "import sys; from indexer.lock import WriterLock\ntry:\n    WriterLock(sys.argv[1]).acquire()\n" \
      "except Exception as exc:\n    print(exc); sys.exit(1)\nprint('acquired')"
REFUSAL = re.compile(r"^(?P<target>.+) is being written by another process \(pid (?P<pid>\d+): (?P<command>.+), "
                     r"since \d\d:\d\d:\d\d\); wait for it or stop it$")


@contextmanager
def started(args, cwd=ROOT, **kwargs):
    """A process that is killed when the test leaves, whatever state (stopped, running) it is in."""
    process = subprocess.Popen(args, cwd=cwd, env=ENV, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextmanager
def holder(target):
    """Another process holding the writer lock on `target`."""
    with started([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline().strip() == "held"
        yield process


def try_lock(target) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY, str(target)], env=ENV, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def wait_for(process, ready):
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready():
        assert process.poll() is None, "the first writer ended before it could be observed at work"
        assert time.monotonic() < deadline, "the first writer never got to work"
        time.sleep(0.002)


def holds_lock(process, target):
    def ready():
        try:
            return json.loads(lock_path(target).read_text())["pid"] == process.pid
        except (OSError, ValueError, KeyError):
            return False
    return ready


def samples_done(target):
    try:
        return json.loads((target.parent / f".{target.name}.partial" / "progress.json").read_text())["samples_done"]
    except (OSError, ValueError, KeyError):
        return 0


def refusal(stderr: str, pid: int) -> dict:
    """The one line a refused writer prints, parsed; it must name `pid`."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    match = REFUSAL.match(lines[0][len("error: "):])
    assert match, lines[0]
    assert int(match["pid"]) == pid
    return match.groupdict()


def indexer_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "indexer", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def noise_images(folder: Path, n: int, seed: int, prefix: str = "p") -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:03d}.png")
    return folder


def snapshot(index):
    with sqlite3.connect(index / "catalog.sqlite") as db:
        tables = (db.execute("SELECT path, width, height FROM images ORDER BY id").fetchall(),
                  db.execute("SELECT image_id, text FROM captions ORDER BY id").fetchall())
    return tables, [np.load(index / name) for name in ("image_vectors.npy", "caption_vectors.npy")]


def assert_same_index(a, b):
    (tables_a, vectors_a), (tables_b, vectors_b) = snapshot(a), snapshot(b)
    assert tables_a == tables_b
    for x, y in zip(vectors_a, vectors_b):
        np.testing.assert_allclose(x, y, atol=1e-5)


# -- the lock itself ----------------------------------------------------------------------------------------------

def test_a_second_process_is_refused_by_name_until_the_first_releases(tmp_path):
    target = tmp_path / "index"
    with WriterLock(target):
        with WriterLock(target):  # re-entrant in this thread: the CLI around its IndexWriter
            pass
        refused = try_lock(target)  # still held after the inner block
        assert refused.returncode == 1
        found = refusal("error: " + refused.stdout, os.getpid())
        assert found["target"] == str(target) and "pytest" in found["command"]
    acquired = try_lock(target)
    assert (acquired.returncode, acquired.stdout.strip()) == (0, "acquired")
    assert lock_path(target).is_file()  # never deleted: deleting a flock'd file races


def test_another_thread_of_the_same_process_is_refused(tmp_path):
    target = tmp_path / "index"
    errors = []

    def other_writer():
        try:
            WriterLock(target).acquire()
        except WriterBusyError as exc:
            errors.append(str(exc))

    with WriterLock(target):
        thread = threading.Thread(target=other_writer)
        thread.start()
        thread.join()
    assert errors == [f"{target} is being written by another thread of this process; wait for it or stop it"]


def test_a_lock_left_by_kill_9_is_free_again(tmp_path):
    target = tmp_path / "index"
    with holder(target) as process:
        with pytest.raises(WriterBusyError, match=f"pid {process.pid}: "):
            WriterLock(target).acquire()
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.loads(lock_path(target).read_text())["pid"] == process.pid  # its details stay; the lock does not
    with WriterLock(target):
        pass


def test_a_forked_child_outliving_the_holder_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a forked child: its copy of the lock's descriptor must not keep a killed holder's lock."""
    target = tmp_path / "model"
    code = ("import os, sys, time; from indexer.lock import WriterLock; WriterLock(sys.argv[1]).acquire()\n"
            "child = os.fork()\nif child == 0:\n    time.sleep(3600)\nprint(child, flush=True); time.sleep(3600)")
    with started([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True) as process:
        child = int(process.stdout.readline())
        try:
            with pytest.raises(WriterBusyError):
                WriterLock(target).acquire()
            process.send_signal(signal.SIGKILL)
            process.wait()
            os.kill(child, 0)  # still alive
            with WriterLock(target):
                pass
        finally:
            os.kill(child, signal.SIGKILL)


def test_bad_input_leaves_no_folder_or_lock_file(tmp_path, capsys):
    assert indexer_main(["update", "--index", str(tmp_path / "nowhere" / "index")]) == 1
    assert indexer_main(["build", "--format", "csv", "--annotations", str(tmp_path / "missing.csv"), "--images",
                         str(tmp_path), "--out", str(tmp_path / "nowhere" / "index")]) == 1
    assert "missing.csv" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_demo_is_prepared_by_one_process_at_a_time(tmp_path, capsys):
    root = tmp_path / "demo"
    with holder(root) as process:
        assert web_main(["--demo", "--demo-dir", str(root), "--demo-scale", "tiny", "--prepare-only"]) == 1
        refusal(capsys.readouterr().err, process.pid)
    assert not (root / "scenes").exists() and not (root / "model").exists()  # nothing generated or trained


# -- two real writers through the CLI ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_update_is_refused_and_the_first_finishes_as_a_normal_update(tmp_path, tiny_model_spec):
    photos = noise_images(tmp_path / "photos", 12, seed=0)
    index, expected = tmp_path / "index", tmp_path / "expected"
    assert indexer_main(["build", "--format", "folder", "--images", str(photos), "--out", str(index), "--model",
                         tiny_model_spec, "--quiet"]) == 0
    shutil.copytree(index, expected)
    noise_images(photos, 200, seed=1, prefix="new")  # enough work that the first update is seen at it
    update = [sys.executable, "-m", "indexer", "update", "--index", "index", "--batch-size", "1", "--workers", "1",
              "--quiet"]
    with started(update, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as first:
        wait_for(first, lambda: samples_done(index) >= 1)
        first.send_signal(signal.SIGSTOP)
        progress = (tmp_path / ".index.partial" / "progress.json").read_bytes()
        second = indexer_cli("update", "--index", "index", "--quiet", cwd=tmp_path)
        assert second.returncode == 1
        found = refusal(second.stderr, first.pid)
        assert found["target"] == "index" and "-m indexer update --index index" in found["command"]
        assert (tmp_path / ".index.partial" / "progress.json").read_bytes() == progress  # its work untouched
        first.send_signal(signal.SIGCONT)
        assert first.wait(HANG_GUARD_S) == 0, first.stderr.read()
    assert indexer_main(["update", "--index", str(expected), "--quiet"]) == 0
    assert_same_index(index, expected)
    assert snapshot(index)[1][0].shape[0] == 212


@pytest.mark.slow
def test_kill_9_frees_the_lock_and_a_second_build_never_discards_a_live_resume(tmp_path, tiny_model_spec):
    photos = noise_images(tmp_path / "photos", 120, seed=2)
    reference = tmp_path / "reference"
    assert indexer_main(["build", "--format", "folder", "--images", str(photos), "--out", str(reference), "--model",
                         tiny_model_spec, "--quiet"]) == 0
    build = ["build", "--format", "folder", "--images", "photos", "--out", "index", "--model", tiny_model_spec,
             "--batch-size", "1", "--workers", "1", "--quiet"]
    index, partial = tmp_path / "index", tmp_path / ".index.partial"
    with started([sys.executable, "-m", "indexer", *build], cwd=tmp_path, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL) as killed:
        wait_for(killed, lambda: samples_done(index) >= 1)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
    assert json.loads(lock_path(index).read_text())["pid"] == killed.pid and partial.is_dir()

    with started([sys.executable, "-m", "indexer", *build, "--resume"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, text=True) as resumed:
        wait_for(resumed, holds_lock(resumed, index))  # the kill -9'd build's lock was free
        resumed.send_signal(signal.SIGSTOP)
        progress = (partial / "progress.json").read_bytes()
        # a plain build would discard the interrupted work, --overwrite too; --resume would race the first
        for extra in ([], ["--overwrite"], ["--resume"]):
            second = indexer_cli(*build, *extra, cwd=tmp_path)
            assert second.returncode == 1
            assert refusal(second.stderr, resumed.pid)["target"] == "index"
            assert (partial / "progress.json").read_bytes() == progress
        resumed.send_signal(signal.SIGCONT)
        assert resumed.wait(HANG_GUARD_S) == 0, resumed.stderr.read()
    assert_same_index(index, reference)
    assert not partial.exists()


@pytest.mark.slow
def test_finetune_into_a_folder_another_finetune_holds_is_refused(tmp_path):
    pairs = make_pairs(32, seed=5)
    write_images(tmp_path / "images", pairs)
    write_flickr8k(tmp_path / "text", pairs, ["train"] * len(pairs))
    (tmp_path / "tiny.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG}))
    finetune = ["finetune", "--format", "flickr8k", "--annotations", "text/Flickr8k.token.txt", "--images", "images",
                "--split", "train", "--out", "model", "--model", "tiny.json", "--pretrained", "none",
                "--batch-size", "16", "--workers", "0", "--epochs", "1", "--quiet"]
    assert indexer_cli(*finetune, cwd=tmp_path).returncode == 0
    model = tmp_path / "model"
    before = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    with started([sys.executable, "-m", "indexer", *finetune, "--overwrite", "--seed", "1"], cwd=tmp_path,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as first:
        wait_for(first, holds_lock(first, model))
        first.send_signal(signal.SIGSTOP)
        for extra in (["--overwrite"], ["--resume"]):
            second = indexer_cli(*finetune, *extra, cwd=tmp_path)
            assert second.returncode == 1
            assert refusal(second.stderr, first.pid)["target"] == "model"
        assert {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before
        first.send_signal(signal.SIGCONT)
        assert first.wait(HANG_GUARD_S) == 0, first.stderr.read()
    assert json.loads((model / "training.json").read_text())["config"]["seed"] == 1  # the first one's model
