"""`--engine ray` (indexer/ray_engine.py, ray_build.py): every build and update equals the local engine's, on one
session-scoped local Ray, on a real two-node cluster on loopback, after a killed actor and after a killed driver."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .helpers import draw, make_pairs, write_images, write_karpathy
from .ray_helpers import processes_matching, start_cluster, stop_cluster

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for the session (2 CPUs: the encoding pool gets CPUs - 1 actors); its GCS address for CLI runs."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def dataset(root: Path, n: int, seed: int = 3) -> tuple[Path, Path]:
    """n generated images (one of them not an image at all) with three captions each, in a Karpathy file."""
    pairs = make_pairs(min(n, 96), seed=seed)  # 96 distinct drawings; more as renamed copies
    while len(pairs) < n:
        pairs += [(f"copy{len(pairs)}_{name}", captions, drawing)
                  for name, captions, drawing in make_pairs(min(96, n - len(pairs)), seed + len(pairs))]
    images = write_images(root / "images", pairs)
    (images / "img_005.png").write_bytes(b"this is not a picture")
    return images, write_karpathy(root / "k.json", pairs, ["test"] * n)


def indexer(*args: str, cwd: Path = ROOT, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "indexer", *args], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    process = indexer(*args, **kwargs)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def build_args(images: Path, annotations: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["build", "--format", "karpathy", "--annotations", str(annotations), "--images", str(images),
            "--out", str(out), "--model", model, "--quiet", *extra]


def assert_same_index(a: Path, b: Path) -> None:
    """Same catalog rows (ids, paths, sizes, file identity, captions), same skips, vectors within 1e-5."""
    def rows(index):
        with sqlite3.connect(index / "catalog.sqlite") as db:
            return [db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall() for table in ("images", "captions")]

    assert rows(a) == rows(b)
    for name in ("image_vectors.npy", "caption_vectors.npy"):
        x, y = np.load(a / name), np.load(b / name)
        assert x.shape == y.shape and len(x) > 0
        np.testing.assert_allclose(x, y, atol=1e-5)
    manifests = [json.loads((index / "manifest.json").read_text()) for index in (a, b)]
    assert manifests[0]["skipped"] == manifests[1]["skipped"] and manifests[0]["skipped"]


def test_ray_build_equals_local_build(ray_address, tiny_model_spec, tmp_path):
    from indexer.pipeline import BuildConfig, build_index
    from indexer.ray_build import build_index_on_ray
    from indexer.ray_engine import RayOptions
    from indexer.readers import read_dataset
    from search.encoders import EncoderSpec, create_encoder

    images, annotations = dataset(tmp_path, 30)
    samples = read_dataset("karpathy", annotations, images)
    encoder = create_encoder(EncoderSpec.from_args(tiny_model_spec, None))
    config = BuildConfig(progress=False)
    local = build_index(samples, images, encoder, tmp_path / "local", config)
    on_ray = build_index_on_ray(samples, images, encoder, tmp_path / "ray", config, RayOptions(partition_samples=8))
    assert (on_ray.n_images, on_ray.n_captions, on_ray.skipped) == (local.n_images, local.n_captions, local.skipped)
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    assert not (tmp_path / ".ray.partial").exists() and not (tmp_path / "ray" / "ray-parts").exists()


def test_cli_build_and_update_on_ray_equal_local(ray_address, tiny_model_spec, tmp_path):
    """As a user runs it: relative paths from another working directory, joining a running cluster by address;
    then an update (new, changed, moved and deleted images, one more caption file) on each engine."""
    work = tmp_path / "work"
    images, annotations = dataset(work / "data", 24)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel = Path("..") / "work" / "data"
    run(*build_args(rel / "images", rel / "k.json", Path("local"), tiny_model_spec), cwd=elsewhere)
    run(*build_args(rel / "images", rel / "k.json", Path("on-ray"), tiny_model_spec, "--engine", "ray",
                    "--ray-address", ray_address, "--partition-samples", "5"), cwd=elsewhere)
    assert_same_index(elsewhere / "local", elsewhere / "on-ray")

    pairs = make_pairs(30, seed=3)  # the same 24 pairs and 6 more: new images with new captions
    write_images(images, pairs[24:])
    write_karpathy(annotations, pairs, ["test"] * 30)
    (images / "img_003.png").rename(images / "img_003_renamed.png")  # moved: the annotation now misses it
    draw("circle", "red", "pale", size=40).save(images / "img_002.png")  # changed content
    (images / "img_004.png").unlink()
    local = run("update", "--index", "local", "--quiet", cwd=elsewhere)
    on_ray = run("update", "--index", "on-ray", "--quiet", "--engine", "ray", "--ray-address", ray_address,
                 "--partition-samples", "7", cwd=elsewhere)
    assert_same_index(elsewhere / "local", elsewhere / "on-ray")
    changes = [line.split("; ")[-1] for line in (local.stdout.strip(), on_ray.stdout.strip())]
    assert changes[0] == changes[1] and "6 new, 1 changed" in changes[0] and "2 removed" in changes[0]


def _wait(condition, process: subprocess.Popen, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the build ended before {what} (exit {process.returncode}): {process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_killed_driver_resumes_from_finished_partitions(ray_address, tiny_model_spec, tmp_path):
    images, annotations = dataset(tmp_path / "data", 160)
    run(*build_args(images, annotations, tmp_path / "local", tiny_model_spec))
    args = build_args(images, annotations, tmp_path / "on-ray", tiny_model_spec, "--engine", "ray", "--ray-address",
                      ray_address, "--partition-samples", "8", "--batch-size", "4")
    parts = tmp_path / ".on-ray.partial" / "ray-parts"
    driver = indexer(*args)
    _wait(lambda: parts.is_dir() and any(parts.glob("part-??????.npz")), driver, what="the first finished partition")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = len(list(parts.glob("part-??????.npz")))  # not a part-NNNNNN.tmp.npz the kill cut short
    assert 1 <= finished < 20 and not (tmp_path / "on-ray").exists()
    resumed = run(*[arg for arg in args if arg != "--quiet"], "--resume")  # not quiet: its info line counts
    assert int(resumed.stderr.split("resuming: ")[1].split(" of ")[0]) >= finished  # not computed again
    assert_same_index(tmp_path / "local", tmp_path / "on-ray")


def test_killed_encoding_actor_is_replaced_and_the_result_unchanged(ray_address, tiny_model_spec, tmp_path):
    images, annotations = dataset(tmp_path / "data", 120)
    run(*build_args(images, annotations, tmp_path / "local", tiny_model_spec))
    driver = indexer(*build_args(images, annotations, tmp_path / "on-ray", tiny_model_spec, "--engine", "ray",
                                 "--ray-address", ray_address, "--partition-samples", "8", "--batch-size", "4"))
    _wait(lambda: processes_matching("EncodeActor"), driver, what="the encoding actor started")
    victims = processes_matching("EncodeActor")
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "on-ray").exists(), "the job finished before the actor could be killed"
    out, err = driver.communicate(timeout=240)
    assert driver.returncode == 0, err[-3000:]
    assert_same_index(tmp_path / "local", tmp_path / "on-ray")


def test_two_node_cluster_on_loopback_builds_the_same_index(tiny_model_spec, tmp_path):
    """`ray start --head` and `ray start --address` as separate processes (one CPU each), stopped afterwards."""
    images, annotations = dataset(tmp_path / "data", 24)
    run(*build_args(images, annotations, tmp_path / "local", tiny_model_spec))
    cluster = start_cluster(nodes=2)
    try:
        run(*build_args(images, annotations, tmp_path / "two-nodes", tiny_model_spec, "--engine", "ray",
                        "--ray-address", cluster.address, "--partition-samples", "6"), env=cluster.env)
        assert len(cluster.node_ids()) == 2
    finally:
        stop_cluster(cluster)
    assert_same_index(tmp_path / "local", tmp_path / "two-nodes")


def test_ray_build_on_disk_answers_as_the_local_index(ray_address, tiny_model_spec, tmp_path):
    """`--engine ray --on-disk`: encoded on Ray, the vectors streamed into an on-disk IVF (shards as Ray tasks)."""
    from search.searcher import Searcher

    images, annotations = dataset(tmp_path / "data", 40)
    run(*build_args(images, annotations, tmp_path / "local", tiny_model_spec))
    run(*build_args(images, annotations, tmp_path / "on-disk", tiny_model_spec, "--engine", "ray", "--ray-address",
                    ray_address, "--partition-samples", "8", "--on-disk", "--index-type", "IVF4,Flat",
                    "--target-recall", "1.0"))
    assert_same_index(tmp_path / "local", tmp_path / "on-disk")
    manifest = json.loads((tmp_path / "on-disk" / "manifest.json").read_text())
    assert manifest["indexes"]["images"]["on_disk"] and (tmp_path / "on-disk" / "images.ivfdata").is_file()
    local, on_disk = Searcher.open(tmp_path / "local"), Searcher.open(tmp_path / "on-disk")
    for caption in ("a red circle on a dark background", "blue bar", "the triangle is yellow"):
        expected = [(hit.image, round(hit.score, 5)) for hit in local.search(text=caption, k=5)]
        assert [(hit.image, round(hit.score, 5)) for hit in on_disk.search(text=caption, k=5)] == expected


def test_more_workers_than_the_cluster_holds_is_a_one_line_error(ray_address, tiny_model_spec, tmp_path):
    images, annotations = dataset(tmp_path / "data", 8)
    process = indexer(*build_args(images, annotations, tmp_path / "index", tiny_model_spec, "--engine", "ray",
                                  "--ray-address", ray_address, "--workers", "5"))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--workers 5" in errors[0] and "room for 1" in errors[0]
    assert not (tmp_path / "index").exists() and not (tmp_path / ".index.partial").exists()
