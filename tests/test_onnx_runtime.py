"""The ONNX Runtime encoder family: vectors equal open_clip's, a torch-free query/build/serve path, the export cache
(stale weights re-exported, refusals remembered) and the runtime choice."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from search.encoders import EncoderSpec, create_encoder
from search.errors import ModelLoadError
from search.onnxrt.exports import exports_root, find_export

from .helpers import draw, make_pairs, write_images

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "torchvision", "timm")

# runs a command-line module in this interpreter and reports which heavy modules it imported
TORCH_FREE = """
import runpy, sys
sys.argv = {argv!r}
code = 0
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
leaked = sorted(m for m in {heavy!r} if m in sys.modules)
print("LEAKED", leaked, file=sys.stderr)
sys.exit(code or (3 if leaked else 0))
"""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run_torch_free(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    script = TORCH_FREE.format(argv=[module, *args], module=module, heavy=HEAVY)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def spec(trained_model_dir):
    return EncoderSpec.from_args(f"local-dir:{trained_model_dir}", None)


@pytest.fixture(scope="module")
def encoders(spec):
    return create_encoder(spec, "torch"), create_encoder(spec, "onnx")


TEXTS = ["a red circle on a grey background", "", "green bar", "Two DOGS & a cat's “toy” 東京 🙂", "word " * 90]


def test_onnx_vectors_equal_open_clips(encoders):
    torch_encoder, onnx_encoder = encoders
    assert (onnx_encoder.runtime, torch_encoder.runtime) == ("onnx", "torch")
    assert onnx_encoder.fingerprint == torch_encoder.fingerprint and onnx_encoder.dim == torch_encoder.dim
    images = [draw(*p[2]) for p in make_pairs(12, seed=3)] + [draw("circle", "red", "grey", size=300)]
    for image in images:  # preprocessing: bit-identical
        assert np.array_equal(onnx_encoder.preprocess_image(image), torch_encoder.preprocess_image(image))
    assert cosines(onnx_encoder.encode_images(images), torch_encoder.encode_images(images)).min() >= 0.99999
    assert cosines(onnx_encoder.encode_texts(TEXTS), torch_encoder.encode_texts(TEXTS)).min() >= 0.99999
    assert np.array_equal(onnx_encoder.tokenize(TEXTS), torch_encoder.tokenize(TEXTS).numpy())


def test_int8_towers_stay_close_to_fp32(spec, encoders):
    torch_encoder = encoders[0]
    int8 = create_encoder(spec, "onnx", precision="int8")
    assert int8.precision == "int8" and int8.export.path("image", "int8").is_file()
    images = [draw(*p[2]) for p in make_pairs(12, seed=4)]
    assert cosines(int8.encode_images(images), torch_encoder.encode_images(images)).min() >= 0.999
    assert cosines(int8.encode_texts(TEXTS), torch_encoder.encode_texts(TEXTS)).min() >= 0.999


def test_only_the_tower_a_query_needs_is_loaded(spec):
    encoder = create_encoder(spec, "onnx")
    encoder.encode_texts(["a red circle"])
    assert set(encoder._sessions) == {"text"}
    encoder.encode_images([draw("circle", "red", "grey")])
    assert set(encoder._sessions) == {"image", "text"}


def test_auto_prefers_onnx_on_the_cpu_and_torch_where_onnx_cannot_run(spec):
    assert create_encoder(spec).runtime == "onnx"
    assert create_encoder(spec, precision="bf16").runtime == "torch"
    with pytest.raises(ModelLoadError, match="fp32 or int8"):
        create_encoder(spec, "onnx", precision="bf16")
    random_weights = EncoderSpec.from_args("ViT-B-32", "none")
    with pytest.raises(ModelLoadError, match="unknown runtime"):
        create_encoder(random_weights, "tensorflow")


def test_changed_weights_are_exported_again(trained_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = shutil.copytree(trained_model_dir, tmp_path / "model")
    spec = EncoderSpec.from_args(f"local-dir:{folder}", None)
    first = create_encoder(spec, "onnx")
    assert find_export(spec).folder == first.export.folder
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # same bytes, touched
    assert find_export(spec) is None  # stale: the file's identity changed
    again = create_encoder(spec, "onnx")
    assert again.fingerprint == first.fingerprint and find_export(spec) is not None


def test_a_model_that_cannot_be_exported_is_remembered(trained_model_dir, tmp_path, monkeypatch):
    from search.openclip import export

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(export, "_tokenizer_problem", lambda encoder: "a tokenizer made up by this test")
    spec = EncoderSpec.from_args(f"local-dir:{trained_model_dir}", None)
    assert create_encoder(spec).runtime == "torch"  # auto falls back
    assert find_export(spec).unsupported == "a tokenizer made up by this test"

    def fail(spec):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_model", fail)
    assert create_encoder(spec).runtime == "torch"  # the refusal is read, not re-tried
    with pytest.raises(ModelLoadError, match="made up by this test"):
        create_encoder(spec, "onnx")


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory, trained_model_dir):
    """An index built by the real CLI with --runtime onnx from a fresh export cache (the export runs in a child)."""
    work = tmp_path_factory.mktemp("onnx_cli")
    write_images(work / "photos", make_pairs(12, seed=5))
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", "photos",
                           "--out", "index", "--model", f"local-dir:{trained_model_dir}", "--runtime", "onnx",
                           "--quiet"], cwd=work, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return work


def test_query_and_build_from_the_command_line_never_import_torch(folder_index, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder_index / "cache"))
    manifest = json.loads((folder_index / "index" / "manifest.json").read_text())
    assert manifest["runtime"] == "onnx"
    answers = {}
    for runtime in ("onnx", "auto"):
        done = run_torch_free("search", "query", "--index", "index", "--text", "a red circle", "--json",
                              "--runtime", runtime, cwd=folder_index)
        assert done.returncode == 0 and "LEAKED []" in done.stderr, done.stderr
        answers[runtime] = [h["image"] for h in json.loads(done.stdout)["results"]]
    photo = sorted((folder_index / "photos").iterdir())[0]
    done = run_torch_free("search", "query", "--index", "index", "--image", str(photo), "--json", cwd=folder_index)
    assert done.returncode == 0 and "LEAKED []" in done.stderr, done.stderr
    assert json.loads(done.stdout)["results"][0]["image"] == photo.name
    done = run_torch_free("indexer", "build", "--format", "folder", "--images", "photos", "--out", "again",
                          "--model", manifest["encoder"]["model"], "--quiet", cwd=folder_index)
    assert done.returncode == 0 and "LEAKED []" in done.stderr, done.stderr
    torch_answer = subprocess.run([sys.executable, "-m", "search", "query", "--index", "index", "--text",
                                   "a red circle", "--json", "--runtime", "torch"], cwd=folder_index,
                                  capture_output=True, text=True)
    assert answers["onnx"] == answers["auto"] == [h["image"] for h in json.loads(torch_answer.stdout)["results"]]


def test_the_web_app_serves_without_torch(folder_index):
    script = f"""
import io, sys
from web import create_app
app = create_app(index={str(folder_index / 'index')!r}, runtime="onnx")
client = app.test_client()
assert client.get("/api/search?q=a+red+circle").status_code == 200
encoder = app.extensions["image_search"].searcher.encoder
towers = sorted(encoder._sessions)
photo = open(sorted(__import__('pathlib').Path({str(folder_index / 'photos')!r}).iterdir())[0], "rb").read()
answer = client.post("/api/search/image", data={{"image": (io.BytesIO(photo), "q.png")}})
assert answer.status_code == 200, answer.get_json()
print(towers, sorted(encoder._sessions), sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(folder_index / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['text'] ['image', 'text'] []"


def test_runtime_errors_are_one_line(folder_index):
    done = subprocess.run([sys.executable, "-m", "search", "query", "--index", "index", "--text", "x", "--runtime",
                           "onnx", "--precision", "bf16"], cwd=folder_index, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "search", "query", "--index", "index", "--text", "x", "--runtime",
                           "jax"], cwd=folder_index, capture_output=True, text=True)
    assert done.returncode == 1 and "error:" in done.stderr


@pytest.mark.slow
def test_vit_b_32_on_onnx_runtime_equals_open_clip_on_real_photos(tmp_path, monkeypatch):
    """The real architecture (random weights, same graph as the published ones) on real photos and captions."""
    import open_clip

    from search.openclip.local_dir import init_local_dir

    data = pytest.importorskip("skimage.data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = init_local_dir(open_clip.get_model_config("ViT-B-32"), tmp_path / "vit_b_32", seed=0)
    spec = EncoderSpec.from_args(f"local-dir:{folder}", None)
    torch_encoder, fp32, int8 = (create_encoder(spec, runtime, precision=precision)
                                 for runtime, precision in (("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8")))
    from PIL import Image

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea",
                                                                                 "rocket", "camera")]
    texts = ["an astronaut in a white suit", "a cup of coffee", "a cat", "a rocket on the launch pad", "",
             "a man with a camera on a tripod in a field, black and white photograph " * 4]
    want_images, want_texts = torch_encoder.encode_images(photos), torch_encoder.encode_texts(texts)
    assert cosines(fp32.encode_images(photos), want_images).min() >= 0.99999
    assert cosines(fp32.encode_texts(texts), want_texts).min() >= 0.99999
    assert cosines(int8.encode_images(photos), want_images).min() >= 0.999
    assert cosines(int8.encode_texts(texts), want_texts).min() >= 0.999
