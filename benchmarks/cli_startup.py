"""Command-line start-up: bad input must answer at once, a query must cost little more than loading its model.

    python -m benchmarks.cli_startup [--runs 7] [--work DIR]

Whole processes (`python -m ...` from the repo root), interleaved round by round, medians over --runs rounds:
  - bad arguments for each CLI (k=0, empty or over-long query, missing image, a directory that is not an index, a
    usage error, --help, a missing annotation file): they must fail before torch is imported;
  - a valid `python -m search query` on a 16-image index built with ViT-B-32 at random weights (same architecture
    and file size as the real model, saved as a local-dir folder): on ONNX Runtime (the towers exported by the
    build), and on torch with the fingerprint cache warm as it is after the build, and cold (an empty cache folder
    each run: the weights are hashed, once per weights file in practice);
  - the baseline, measured in the same rounds: `python -c "import torch, open_clip; <create that model and its
    tokenizer>"`, i.e. the least any query process must do.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, photo_like_images


def prepare(work: Path) -> tuple[Path, Path]:
    """(model folder, index folder), created once in `work`."""
    import open_clip

    from search.openclip.local_dir import init_local_dir

    model, index = work / "model", work / "index"
    if not (model / "open_clip_config.json").is_file():
        init_local_dir(open_clip.get_model_config("ViT-B-32"), model, seed=0)
    if not (index / "manifest.json").is_file():
        photos = work / "photos"
        photo_like_images(photos, 16)
        subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", str(photos),
                        "--out", str(index), "--model", f"local-dir:{model}", "--quiet"], cwd=ROOT, check=True,
                       env=_env(work / "cache"), stdout=subprocess.DEVNULL)
    return model, index


def _env(cache: Path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONWARNINGS": "ignore"}


def cases(work: Path, model: Path, index: Path) -> list[tuple[str, list[str], int]]:
    """(label, python arguments, expected exit status)."""
    query = ["-m", "search", "query", "--index", str(index)]
    return [
        ("search query -k 0", query + ["--text", "a dog", "-k", "0"], 1),
        ("search query --text ''", query + ["--text", ""], 1),
        ("search query, 1001-char text", query + ["--text", "x" * 1001], 1),
        ("search query --image missing.jpg", query + ["--image", str(work / "missing.jpg")], 1),
        ("search query --index not-an-index", ["-m", "search", "query", "--index", str(work), "--text", "a"], 1),
        ("search query -k abc (usage error)", query + ["--text", "a", "-k", "abc"], 1),
        ("indexer build --help", ["-m", "indexer", "build", "--help"], 0),
        ("indexer build, missing annotations", ["-m", "indexer", "build", "--format", "karpathy", "--annotations",
                                                str(work / "missing.json"), "--images", str(work),
                                                "--out", str(work / "new-index")], 1),
        ("indexer info --index not-an-index", ["-m", "indexer", "info", "--index", str(work)], 1),
        ("web --index not-an-index", ["-m", "web", "--index", str(work)], 1),
        ("search query --runtime onnx (exported)", query + ["--text", "a red circle", "-k", "5", "--runtime", "onnx"], 0),
        ("search query --runtime torch (cache warm)", query + ["--text", "a red circle", "-k", "5", "--runtime",
                                                               "torch"], 0),
        ("search query --runtime torch (cache cold)", query + ["--text", "a red circle", "-k", "5", "--runtime",
                                                               "torch"], 0),
        ("baseline: import torch, open_clip + load model",
         ["-c", "import torch, open_clip; open_clip.create_model_and_transforms(%r); open_clip.get_tokenizer(%r)"
          % (f"local-dir:{model}", f"local-dir:{model}")], 0),
    ]


def run(arguments: list[str], expected: int, cache: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=_env(cache), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(f"{arguments[:4]}: exit {done.returncode}, expected {expected}\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="rounds; medians over them (default: 7)")
    parser.add_argument("--work", type=Path, default=None, help="keep the model and index here (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-cli-"))
    work.mkdir(parents=True, exist_ok=True)
    model, index = prepare(work)
    table = cases(work, model, index)
    times: dict[str, list[float]] = {label: [] for label, _, _ in table}
    for round_ in range(args.runs + 1):  # round 0 warms the page cache and the fingerprint cache
        order = table[round_ % len(table):] + table[:round_ % len(table)]  # rotate: no case always runs first
        for label, arguments, expected in order:
            cache = work / "cache"
            if "cache cold" in label:
                cache = Path(tempfile.mkdtemp(dir=work, prefix="cold-cache-"))
            elapsed = run(arguments, expected, cache)
            if round_:
                times[label].append(elapsed)

    print(machine())
    print(f"{args.runs} interleaved rounds of whole processes, median seconds (min–max)")
    medians = {label: statistics.median(values) for label, values in times.items()}
    for label, values in times.items():
        print(f"  {label:48} {medians[label]:6.2f}  ({min(values):.2f}–{max(values):.2f})")
    baseline = medians["baseline: import torch, open_clip + load model"]
    for label in ("search query --runtime onnx (exported)", "search query --runtime torch (cache warm)",
                  "search query --runtime torch (cache cold)"):
        print(f"{label} / baseline: {medians[label] / baseline:.2f}x")
    onnx, torch = medians["search query --runtime onnx (exported)"], medians["search query --runtime torch (cache warm)"]
    print(f"onnx query: {onnx:.2f} s, {torch / onnx:.1f}x faster than the torch query")
    slowest_bad = max(medians[label] for label, _, expected in table
                      if expected == 1 or label.endswith("--help"))
    print(f"slowest bad-argument case: {slowest_bad:.2f} s")


if __name__ == "__main__":
    main()
