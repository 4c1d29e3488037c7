"""Serving the same random weights to each tool that benchmarks/peers.py times, and running its processes.

Weights are drawn once per architecture (init_local_dir, seed 0) into a local-dir folder (ours and the plain open_clip
loop read it); clip-retrieval gets them as a Hugging Face cache (HF_HOME), rclip as ONNX files in RCLIP_DATADIR. The
peers' commands are looked up in the virtualenvs given; a Step is one whole process, run under GNU time.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, photo_like_images
from search.openclip import WEIGHTS_FILE

QUERY = "a dog on a beach"
CR_ARCH, CR_PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"  # what clip-retrieval is told to load
CR_BATCH, CR_WORKERS = 64, 2
RCLIP_ARCH, RCLIP_MODEL_SUBDIR = "ViT-B-32-256", "ViT-B-32-256-datacomp_s34b_b86k"  # rclip's only model
RCLIP_VOCAB = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
RCLIP_IMAGE_SIZE, CONTEXT_LENGTH, ONNX_OPSET = 256, 77, 18  # as in rclip's scripts/convert_model.py
HF_REVISION = "0" * 40  # any name works offline: refs/main points the cache at snapshots/<it>
LOOP_BATCH, WARM_PHOTOS = 32, 8
TIME = "/usr/bin/time"  # GNU time: %M = peak RSS in KB of the process it runs

LOOP_SCRIPT = """import sys
from pathlib import Path
import numpy as np, open_clip, torch
from PIL import Image
model_dir, photos, out = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + model_dir)
model.eval()
paths = sorted(Path(photos).glob("*.jpg"))
chunks = []
with torch.inference_mode():
    for start in range(0, len(paths), %d):
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start:start + %d]])
        chunks.append(torch.nn.functional.normalize(model.encode_image(batch), dim=-1).numpy())
np.savez(out, vectors=np.concatenate(chunks), names=np.array([p.name for p in paths]))
""" % (LOOP_BATCH, LOOP_BATCH)


@dataclass(frozen=True)
class Step:
    """One whole process, measured on its own; `label` is "job|tool"."""
    label: str
    argv: tuple
    cwd: Path
    env: dict = field(hash=False)
    expected: int = 0


@dataclass(frozen=True)
class Job:
    """Steps run one after the other (a later one may read an earlier one's output); `fresh` is removed first."""
    steps: tuple
    fresh: tuple = ()


def run(step: Step) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of its largest process) of one whole process. Under GNU time, a small parent:
    Linux carries the RSS high-water mark of the forking process (this one, torch loaded) across exec."""
    with tempfile.TemporaryFile() as output, tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()
        done = subprocess.run((TIME, "-f", "%M", "-o", peak.name, *step.argv), cwd=step.cwd, env=step.env,
                              stdout=output, stderr=subprocess.STDOUT)
        elapsed = time.perf_counter() - start
        if done.returncode != step.expected:
            output.seek(0)
            raise SystemExit(f"{step.label}: exit {done.returncode}, expected {step.expected}\n"
                             + output.read().decode(errors="replace")[-3000:])
        kilobytes = int(peak.read().split()[-1])  # after a "Command exited with non-zero status" line if any
    return elapsed, kilobytes / 1024


def run_job(job: Job) -> dict[str, tuple[float, float]]:
    for path in job.fresh:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return {step.label: run(step) for step in job.steps}


def make_model(arch: str, folder: Path) -> Path:
    import open_clip

    from search.openclip.local_dir import init_local_dir

    if not (folder / WEIGHTS_FILE).is_file():
        init_local_dir(open_clip.get_model_config(arch), folder, seed=0)
    return folder


def hf_cache(model: Path, hf_home: Path) -> Path:
    """HF_HOME whose hub cache holds `model`'s weights as the file open_clip fetches for CR_ARCH/CR_PRETRAINED."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME

    repo, filename = os.path.split(open_clip.get_pretrained_cfg(CR_ARCH, CR_PRETRAINED)["hf_hub"])
    if not filename or filename.endswith((".bin", ".pth")):  # open_clip tries the safetensors name first
        filename = filename[:-4] + ".safetensors" if filename else HF_SAFE_WEIGHTS_NAME
    cached = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    target = cached / "snapshots" / HF_REVISION / filename
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model / WEIGHTS_FILE, target)
        (cached / "refs").mkdir(exist_ok=True)
        (cached / "refs" / "main").write_text(HF_REVISION)
    return hf_home


def rclip_datadir(model: Path, datadir: Path) -> Path:
    """RCLIP_DATADIR with visual.onnx / textual.onnx exported and verified as rclip's convert script does."""
    folder = datadir / RCLIP_MODEL_SUBDIR
    if (folder / "textual.onnx").is_file():
        return datadir
    import onnxruntime as ort
    import open_clip
    import torch

    class TextTower(torch.nn.Module):  # the script's _TextualWrapper
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, tokens):
            return self.clip.encode_text(tokens)

    clip = open_clip.create_model_and_transforms(f"local-dir:{model}")[0].eval()
    folder.mkdir(parents=True, exist_ok=True)
    towers = {"visual": (clip.visual, torch.randn(2, 3, RCLIP_IMAGE_SIZE, RCLIP_IMAGE_SIZE)),
              "textual": (TextTower(clip).eval(), torch.randint(0, 49408, (2, CONTEXT_LENGTH)))}
    for name, (tower, example) in towers.items():
        partial = folder / f"{name}.partial.onnx"
        with warnings.catch_warnings():  # the legacy exporter's deprecation notice: the script uses it too
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, (example[:1],), str(partial), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=ONNX_OPSET,
                              dynamo=False)
        with torch.no_grad():
            expected = tower(example).numpy()
        session = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        difference = float(np.abs(session.run(None, {"input": example.numpy()})[0] - expected).max())
        if difference > 1e-4:  # the script's own check, on a batch of 2 as there
            raise SystemExit(f"rclip {name}.onnx diverges from torch by {difference}")
        os.replace(partial, folder / f"{name}.onnx")
    (datadir / RCLIP_VOCAB).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", datadir / RCLIP_VOCAB)
    return datadir


@dataclass
class Setup:
    work: Path
    photos: Path
    env: dict  # ours and the open_clip loop: our interpreter, XDG_CACHE_HOME inside --work
    models: dict  # architecture -> local-dir folder
    variants: dict  # architecture -> [(runtime, precision)] of our builds; runtime "" = the CLI's default
    query_indexes: dict = field(default_factory=dict)  # architecture -> an index of the main photos
    tools: dict = field(default_factory=dict)  # "rclip" / "clip-retrieval" -> its command, when found
    peer_env: dict = field(default_factory=dict)  # "rclip" / "rclip-query" / "clip-retrieval" -> its environment

    def ours(self, arch: str, runtime: str, precision: str, photos: Path, out: Path) -> Step:
        argv = (sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", str(photos), "--out",
                str(out), "--model", f"local-dir:{self.models[arch]}", "--overwrite", "--quiet", "--precision",
                precision) + (("--runtime", runtime) if runtime else ())
        return Step(f"index {arch}|ours {runtime or 'default'} {precision}", argv, ROOT, self.env)


def prepare(work: Path, n: int, venvs: list[Path]) -> Setup:
    photos = work / f"photos-{n}"
    photo_like_images(photos, n)
    photo_like_images(work / "photos-warm", WARM_PHOTOS, seed=1)
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "PYTHONWARNINGS": "ignore"}
    models = {arch: make_model(arch, work / "models" / arch) for arch in (CR_ARCH, RCLIP_ARCH)}
    help_text = subprocess.run([sys.executable, "-m", "indexer", "build", "--help"], cwd=ROOT, capture_output=True,
                               text=True).stdout
    onnx = "--runtime" in help_text  # the flag came with the ONNX runtime; without it, rows for the default one
    builds = [("onnx", "fp32"), ("onnx", "int8")] if onnx else [("", "fp32"), ("", "int8")]
    variants = {CR_ARCH: builds + ([("torch", "fp32")] if onnx else []), RCLIP_ARCH: builds}
    setup = Setup(work, photos, env, models, variants)
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for name in ("rclip", "clip-retrieval"):
        tool = next((venv / "bin" / name for venv in venvs if (venv / "bin" / name).is_file()), None)
        if tool:
            setup.tools[name] = tool
            setup.peer_env[name] = {**env, **offline, "PATH": f"{tool.parent}{os.pathsep}{env.get('PATH', '')}"}
    if "clip-retrieval" in setup.tools:
        setup.peer_env["clip-retrieval"]["HF_HOME"] = str(hf_cache(models[CR_ARCH], work / "hf"))
    if "rclip" in setup.tools:
        datadir = rclip_datadir(models[RCLIP_ARCH], work / "rclip-index")
        setup.peer_env["rclip"]["RCLIP_DATADIR"] = str(datadir)
        query_dir = work / "rclip-query"  # a second data folder: its database is the one the timed queries read
        query_dir.mkdir(exist_ok=True)
        for name in (RCLIP_MODEL_SUBDIR, Path(RCLIP_VOCAB).parent.name):
            if not (query_dir / name).exists():
                (query_dir / name).symlink_to(datadir / name)
        setup.peer_env["rclip-query"] = {**setup.peer_env["rclip"], "RCLIP_DATADIR": str(query_dir)}
        run(Step("rclip|index for the queries", (str(setup.tools["rclip"]), "-f", QUERY), photos,
                 setup.peer_env["rclip-query"]))
    return setup


def first_builds(setup: Setup) -> dict[tuple[str, str], tuple[float, bool]]:
    """Build the query indexes, timing these first builds: (job, tool) -> (seconds, whether the build exported or
    quantised a model into the ONNX cache, a one-time cost)."""
    try:
        from search.fingerprints import APP_DIR
        from search.onnxrt.exports import EXPORTS_DIR
        cache = Path(setup.env["XDG_CACHE_HOME"]) / APP_DIR / EXPORTS_DIR
    except ImportError:  # a version of ours without the ONNX runtime: nothing to export
        cache = setup.work / "no-exports"
    found = {}
    for arch in setup.models:
        for runtime, precision in setup.variants[arch]:
            out = setup.work / "query-index" / f"{arch}-{runtime or 'default'}-{precision}"
            before = sorted(cache.rglob("*.onnx"))
            step = setup.ours(arch, runtime, precision, setup.photos, out)
            found[tuple(step.label.split("|"))] = (run(step)[0], sorted(cache.rglob("*.onnx")) != before)
            setup.query_indexes.setdefault(arch, out)
    return found
