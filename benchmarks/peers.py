"""Us side by side with rclip, clip-retrieval and a plain open_clip loop: same photos, same random weights.

    python -m benchmarks.peers [--peers-venv /work/peers/venv --peers-venv /work/peers/venv-clip-retrieval]
                               [--images 512] [--runs 3] [--work DIR]

Installs nothing. Each --peers-venv is searched for the `rclip` and `clip-retrieval` commands; a tool not found is
left out, and with none only our figures and the open_clip loop (always there: our own environment) are printed.
Weights are drawn once per architecture (init_local_dir, seed 0) and served to each tool its own way:
  - us: `--model local-dir:FOLDER`;
  - clip-retrieval (ViT-B-32): the files open_clip fetches for `open_clip:ViT-B-32/laion2b_s34b_b79k`, laid out as a
    Hugging Face cache (HF_HOME, models--ORG--REPO/snapshots/REV/FILE + refs/main), run with HF_HUB_OFFLINE=1;
  - rclip (ViT-B-32-256): visual.onnx / textual.onnx exported and checked the way rclip's scripts/convert_model.py
    does (input "input", output "output", dynamic batch, opset 18), plus open_clip's tokenizer vocabulary, in the
    folder RCLIP_DATADIR names, so that it never downloads;
  - the open_clip loop: a whole process that loads the same folder, applies open_clip's preprocess and encodes
    batches of 32 under torch.inference_mode, then saves the vectors (what a user writes first).
clip-retrieval runs at our build's defaults, --batch_size 64 --num_prepro_workers 2 (its own, 256 and 4, make it warm
up on two 256-image batches first and start 4 decoding processes on 2 cores); rclip at its defaults; rclip's indexing
row is `rclip -f QUERY` on an empty database (it indexes the working folder, then answers), its query row `rclip -n`.
Every job is a whole process; rounds are interleaved (the order rotates), round 0 runs every job on 8 photos to warm
caches and is discarded; figures are medians over --runs rounds. Peak MB: the peak resident set of the job's largest
process, from GNU time's %M. Our ONNX runtime exports each model once (cached under $XDG_CACHE_HOME, here a folder of
--work): those first builds are timed on their own lines, outside the medians. Agreement: the mean cosine, file by
file, of each peer's stored vectors with ours (near 1 only if the weights were served as meant).

Peer virtualenvs (not in the repository; two, because rclip pins numpy~=2.1 and huggingface-hub>=1.9 while
clip-retrieval's transformers/sentence-transformers need numpy<2 and huggingface-hub<1.0):
    python -m venv /work/peers/venv
    /work/peers/venv/bin/pip install torch==2.14.1 torchvision==0.29.1   # optional: rclip 3.3.0 runs on onnxruntime
    /work/peers/venv/bin/pip install rclip==3.3.0
    python -m venv /work/peers/venv-clip-retrieval
    P=/work/peers/venv-clip-retrieval/bin/pip
    $P install torch==2.14.1 torchvision==0.29.1
    $P install --no-deps clip-retrieval==2.45.0 all_clip==1.3.0     # both pin open-clip-torch<3: we want 3.3.0
    $P install open-clip-torch==3.3.0 "clip-anytorch>=2.5.0,<3" "tqdm>=4.62.3,<5" "fire>=0.4.0,<0.6.0" \\
        "numpy>=1.19.5,<2" "faiss-cpu>=1.7.2,<2" "flask>=3.0.0,<4" "flask_restful>=0.3.9,<1" "flask_cors>=4.0.0,<5" \\
        "pandas>=1.1.5,<3" "pyarrow>=6.0.1,<16" "autofaiss>=2.17.0,<3" "webdataset>=0.2,<0.3" "h5py>=3.1.0,<4" \\
        "prometheus-client>=0.13.1,<1" fsspec "sentence-transformers>=2.2.0,<3" "wandb>=0.17.0" \\
        "requests>=2.28.0,<3" "aiohttp>=3.8.1,<4" transformers "urllib3>=1.26.0" "scipy>=1.11.0" braceexpand \\
        "setuptools<81"                                                # clip-anytorch imports pkg_resources
(clip-retrieval's other requirements, img2dataset and multilingual-clip, are not imported by `inference`/`index`.)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, machine
from benchmarks.peer_setup import (CR_ARCH, CR_BATCH, CR_PRETRAINED, CR_WORKERS, LOOP_SCRIPT, QUERY, RCLIP_ARCH, TIME,
                                   Job, Setup, Step, first_builds, prepare, run_job)

# peers that do our whole job (clip-retrieval's index step alone is listed, not compared)
COMPARED = ("open_clip loop", "clip-retrieval inference", "clip-retrieval inference + index", "rclip", "rclip -n")
# issue 11's targets: speed ratios (peer s / our s) at least, peak MB and seconds at most
SPEED_TARGETS = {(f"query {RCLIP_ARCH}", "rclip -n"): 1.0, (f"index {RCLIP_ARCH}", "rclip"): 1.2,
                 (f"index {CR_ARCH}", "clip-retrieval inference"): 1.5, (f"index {CR_ARCH}", "open_clip loop"): 1.1}
QUERY_PEAK_MB, BAD_ARGUMENT_SECONDS = 600, 0.3


def jobs(setup: Setup, photos: Path) -> list[Job]:
    out, work, result = setup.work / "out", setup.work, []
    for arch, variants in setup.variants.items():
        for runtime, precision in variants:
            target = out / f"ours-{arch}-{runtime or 'default'}-{precision}"
            result.append(Job((setup.ours(arch, runtime, precision, photos, target),), (target,)))
    loop = work / "openclip_loop.py"
    loop.write_text(LOOP_SCRIPT)
    argv = (sys.executable, str(loop), str(setup.models[CR_ARCH]), str(photos), str(out / "loop.npz"))
    result.append(Job((Step(f"index {CR_ARCH}|open_clip loop", argv, ROOT, setup.env),)))
    if "clip-retrieval" in setup.tools:
        tool, env, emb, index = str(setup.tools["clip-retrieval"]), setup.peer_env["clip-retrieval"], out / "cr-emb", \
            out / "cr-index"
        inference = (tool, "inference", "--input_dataset", str(photos), "--output_folder", str(emb), "--clip_model",
                     f"open_clip:{CR_ARCH}/{CR_PRETRAINED}", "--batch_size", str(CR_BATCH), "--num_prepro_workers",
                     str(CR_WORKERS))
        result.append(Job((Step(f"index {CR_ARCH}|clip-retrieval inference", inference, work, env),
                           Step(f"index {CR_ARCH}|clip-retrieval index", (tool, "index", "--embeddings_folder",
                                                                          str(emb), "--index_folder", str(index)),
                                work, env)), (emb, index)))
    if "rclip" in setup.tools:
        tool, datadir = str(setup.tools["rclip"]), Path(setup.peer_env["rclip"]["RCLIP_DATADIR"])
        result.append(Job((Step(f"index {RCLIP_ARCH}|rclip", (tool, "-f", QUERY), photos, setup.peer_env["rclip"]),),
                          tuple(datadir / f"db.sqlite3{suffix}" for suffix in ("", "-wal", "-shm", "-journal"))))
        result.append(Job((Step(f"query {RCLIP_ARCH}|rclip -n", (tool, "-n", "-f", QUERY), setup.photos,
                                setup.peer_env["rclip-query"]),)))
    query = (sys.executable, "-m", "search", "query", "--text")
    for arch, index in setup.query_indexes.items():
        for runtime in sorted({runtime for runtime, _ in setup.variants[arch]}):
            argv = query + (QUERY, "--index", str(index)) + (("--runtime", runtime) if runtime else ())
            result.append(Job((Step(f"query {arch}|ours {runtime or 'default'}", argv, ROOT, setup.env),)))
    argv = query + ("", "--index", str(setup.query_indexes[CR_ARCH]))
    result.append(Job((Step("bad argument|ours --text ''", argv, ROOT, setup.env, expected=1),)))
    return result


def measure(setup: Setup, runs: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(job, tool) -> [(seconds, peak MB)] per counted round; round 0 runs on the warm-up photos, uncounted."""
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for round_ in range(runs + 1):
        table = jobs(setup, setup.photos if round_ else setup.work / "photos-warm")
        for job in table[round_ % len(table):] + table[:round_ % len(table)]:  # rotate: no job always runs first
            for label, figures in run_job(job).items():
                if round_:
                    results.setdefault(tuple(label.split("|")), []).append(figures)
    steps = [(f"index {CR_ARCH}", "clip-retrieval inference"), (f"index {CR_ARCH}", "clip-retrieval index")]
    if all(key in results for key in steps):  # its whole path from photos to a searchable index
        results[(f"index {CR_ARCH}", "clip-retrieval inference + index")] = [
            (a[0] + b[0], max(a[1], b[1])) for a, b in zip(*(results[key] for key in steps))]
    return results


def _ours_vectors(index: Path) -> dict[str, np.ndarray]:
    from search.layout import CATALOG_NAME, VECTOR_FILES

    with sqlite3.connect(index / CATALOG_NAME) as db:
        rows = db.execute("SELECT id, path FROM images").fetchall()
    vectors = np.load(index / VECTOR_FILES["images"])
    return {Path(path).name: vectors[row] for row, path in rows}


def _loop_vectors(setup: Setup) -> dict[str, np.ndarray]:
    loop = np.load(setup.work / "out" / "loop.npz")
    return dict(zip(loop["names"], loop["vectors"]))


def _rclip_vectors(setup: Setup) -> dict[str, np.ndarray]:
    with sqlite3.connect(Path(setup.peer_env["rclip"]["RCLIP_DATADIR"]) / "db.sqlite3") as db:
        rows = db.execute("SELECT filepath, vector FROM images WHERE deleted IS NULL").fetchall()
    return {Path(path).name: np.frombuffer(vector, np.float32) for path, vector in rows}


def _clip_retrieval_vectors(setup: Setup) -> dict[str, np.ndarray]:
    """Its metadata is parquet: read by its own interpreter (pandas lives there); once more if that one crashes."""
    emb = setup.work / "out" / "cr-emb"
    argv = [str(setup.tools["clip-retrieval"].parent / "python"), "-c", "import sys, json, pandas; print(json.dumps("
            "list(pandas.read_parquet(sys.argv[1])['image_path'])))", str(emb / "metadata" / "metadata_0.parquet")]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
    vectors = np.load(emb / "img_emb" / "img_emb_0.npy").astype(np.float32)
    return {Path(path).name: vector for path, vector in zip(json.loads(done.stdout), vectors)}


def agreement(setup: Setup) -> list[str]:
    """Mean cosine, file by file, of each peer's vectors (as stored in the last round) with ours, beside our vectors'
    mean cosine across different files."""
    ours = {arch: _ours_vectors(index) for arch, index in setup.query_indexes.items()}
    peers = {"open_clip loop": (CR_ARCH, _loop_vectors), "rclip": (RCLIP_ARCH, _rclip_vectors),
             "clip-retrieval": (CR_ARCH, _clip_retrieval_vectors)}
    lines = []
    for peer, (arch, read) in peers.items():
        if peer != "open_clip loop" and peer not in setup.tools:
            continue
        try:
            vectors = read(setup)
        except (OSError, sqlite3.Error, subprocess.CalledProcessError, ValueError) as exc:  # a check, not a figure
            lines.append(f"agreement with ours, {arch}: {peer} not checked ({type(exc).__name__}: {exc})")
            continue
        common = sorted(set(vectors) & set(ours[arch]))
        a, b = (np.stack([source[name] for name in common]) for source in (ours[arch], vectors))
        a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
        cosine, across = (a * b).sum(1), (a @ a.T)[~np.eye(len(common), dtype=bool)].mean()
        lines.append(f"agreement with ours, {arch}: {peer} mean cosine {cosine.mean():.4f} (min {cosine.min():.4f}, "
                     f"{len(common)} files; ours across different files: {across:.2f})")
    return lines


def _medians(results: dict) -> tuple[dict, dict]:
    return ({key: statistics.median(s for s, _ in figures) for key, figures in results.items()},
            {key: statistics.median(m for _, m in figures) for key, figures in results.items()})


def _job_order(job: str) -> tuple:
    return not job.startswith("index"), job


def table(results: dict, n: int) -> list[str]:
    seconds, peak = _medians(results)

    def cells(job: str, tool: str | None) -> list[str]:
        if tool is None:
            return ["—"] * 4
        runs, median = [s for s, _ in results[(job, tool)]], seconds[(job, tool)]
        rate = f"{n / median:.1f}" if job.startswith("index") else ""
        return [tool, f"{median:.2f} ({min(runs):.2f}–{max(runs):.2f})", rate, f"{peak[(job, tool)]:.0f}"]

    header = "job | ours | s (min–max) | img/s | peak MB | peer | s (min–max) | img/s | peak MB | peer s / our s"
    lines = [f"| {header} |", "|---" * 10 + "|"]
    for job in sorted({job for job, _ in results}, key=_job_order):
        tools = sorted(tool for j, tool in results if j == job)
        for ours in (tool for tool in tools if tool.startswith("ours")):
            for peer in [tool for tool in COMPARED if tool in tools] or [None]:
                ratio = f"{seconds[(job, peer)] / seconds[(job, ours)]:.2f}x" if peer else "—"
                lines.append("| " + " | ".join([job, *cells(job, ours), *cells(job, peer), ratio]) + " |")
        for peer in (tool for tool in tools if not tool.startswith("ours") and tool not in COMPARED):
            lines.append("| " + " | ".join([job, *cells(job, None), *cells(job, peer), "—"]) + " |")
    return lines


def targets(results: dict) -> list[str]:
    """Issue 11's targets, each with its figure (speed ratio = peer s / our s: > 1 means we are faster)."""
    seconds, peak = _medians(results)
    lines = []

    def check(name: str, value: float, goal: float, at_least: bool, unit: str, digits: int = 2) -> None:
        met = value >= goal if at_least else value <= goal
        lines.append(f"- {name}: {value:.{digits}f}{unit} (target {'>=' if at_least else '<='} {goal}{unit}) "
                     f"{'met' if met else 'MISSED'}")

    ours = sorted((key for key in seconds if key[1].startswith("ours")), key=lambda key: (_job_order(key[0]), key[1]))
    for job, tool in ours:
        for (target_job, peer), goal in SPEED_TARGETS.items():
            if target_job == job and (job, peer) in seconds:
                ratio = seconds[(job, peer)] / seconds[(job, tool)]
                check(f"{job}, {tool} vs {peer}, speed", ratio, goal, True, "x")
        if job == f"index {RCLIP_ARCH}" and (job, "rclip") in peak:
            check(f"{job}, {tool} peak memory vs rclip's", peak[(job, tool)], round(peak[(job, "rclip")]), False,
                  " MB", 0)
        if job == f"query {CR_ARCH}":
            check(f"{job}, {tool} peak memory", peak[(job, tool)], QUERY_PEAK_MB, False, " MB", 0)
        if job == "bad argument":
            check(f"{job}, {tool} refused in", seconds[(job, tool)], BAD_ARGUMENT_SECONDS, False, " s")
    return lines


def one_time(first: dict, results: dict) -> list[str]:
    seconds, _ = _medians(results)
    return [f"first build, {job}, {tool}: {spent:.1f} s vs {seconds[(job, tool)]:.1f} s steady ("
            + (f"one-time export/quantisation ~{spent - seconds[(job, tool)]:.1f} s)" if exported else
               "nothing exported)") for (job, tool), (spent, exported) in first.items()]


def versions(setup: Setup) -> str:
    found = []
    for name, packages in (("rclip", ("rclip", "onnxruntime")), ("clip-retrieval", ("clip-retrieval",
                                                                                    "open_clip_torch", "torch"))):
        if name in setup.tools:
            code = "import importlib.metadata as m, sys; print(*(m.version(p) for p in sys.argv[1:]))"
            done = subprocess.run([str(setup.tools[name].parent / "python"), "-c", code, *packages],
                                  capture_output=True, text=True)
            found.append(", ".join(f"{p} {v}" for p, v in zip(packages, done.stdout.split())))
    return "peers: " + ("; ".join(found) if found else "none found (only our figures and the open_clip loop)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-venv", type=Path, action="append", default=[],
                        help="a virtualenv holding rclip and/or clip-retrieval (repeatable; default: none)")
    parser.add_argument("--images", type=int, default=512, help="photos per build (default: 512)")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians over them (default: 3)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep photos, models, outputs and results.json here (default: a temp dir)")
    args = parser.parse_args()
    if args.images < 1 or args.runs < 1:
        parser.error("--images and --runs must be at least 1")
    if not os.access(TIME, os.X_OK):
        parser.error(f"{TIME} (GNU time) is needed to measure each process's peak memory")
    logging.basicConfig(level=logging.ERROR)  # open_clip warns that the models made here have random weights: meant
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-peers-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare(work, args.images, [venv.resolve() for venv in args.peers_venv])
    first = first_builds(setup)
    results = measure(setup, args.runs)
    (work / "results.json").write_text(json.dumps({"first builds": {"|".join(k): v for k, v in first.items()},
                                                   "rounds": {"|".join(k): v for k, v in results.items()}}, indent=1))
    print(machine())
    print(versions(setup))
    print(f"{args.images} photo-like 640x480 JPEGs, random weights; {args.runs} interleaved rounds of whole processes, "
          f"medians; peak MB = the job's largest process's peak RSS; text query {QUERY!r}\n")
    print("\n".join(table(results, args.images)))
    print("\n" + "\n".join(one_time(first, results) + agreement(setup)))
    print("\ntargets:\n" + "\n".join(targets(results)))


if __name__ == "__main__":
    main()
