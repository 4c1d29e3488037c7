"""Fast, honest CLI: bad input fails before torch is imported, in one line with exit status 1; the weights fingerprint
(and embedding width) are remembered per weights file and measured again when the file changes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from search.encoders import EncoderSpec, create_encoder
from search.fingerprints import cache_path
from search.openclip import WEIGHTS_FILE, encoder as openclip_encoder, loading
from search.openclip.encoder import OpenClipEncoder, weights_fingerprint as _weights_fingerprint
from search.openclip.local_dir import save_local_dir

from .helpers import TINY_MODEL_CFG, build_test_index, make_pairs

ROOT = Path(__file__).resolve().parents[1]

# runs a CLI's main() as its `python -m` entry point does, then tells whether torch was imported and the exit status
RUN_MAIN = """
import sys
from {module} import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print('torch' in sys.modules, code)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_spec):
    """A folder holding a real index ('index'), an image, a non-index folder and an existing output folder."""
    root = tmp_path_factory.mktemp("startup")
    build_test_index(root, make_pairs(6, seed=5), tiny_model_spec)
    (root / "not_an_index").mkdir()
    (root / "taken").mkdir()
    (root / "taken" / "file.txt").write_text("x")
    return root


def run_main(module: str, args: list[str], cwd: Path, env: dict | None = None) -> tuple[bool, int, str]:
    """(torch imported, exit status, stderr) of `module`'s main(args), in a fresh process started in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run([sys.executable, "-c", RUN_MAIN.format(module=module), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    imported, code = done.stdout.strip().splitlines()[-1].split()
    return imported == "True", int(code), done.stderr


BAD_ARGUMENTS = [
    ("search.cli", ["query", "--index", "index", "--text", "a red circle", "-k", "0"], "k must be between 1 and"),
    ("search.cli", ["query", "--index", "index", "--text", "  "], "empty text query"),
    ("search.cli", ["query", "--index", "index", "--text", "x" * 1001], "text query is 1001 characters"),
    ("search.cli", ["query", "--index", "index", "--image", "missing.jpg"], "missing.jpg: file not found"),
    ("search.cli", ["query", "--index", "not_an_index", "--text", "a"], "is not an index"),
    ("search.cli", ["query", "--index", "nowhere", "--text", "a"], "no such index directory"),
    ("search.cli", ["query", "--index", "index", "--text", "a", "-k", "ten"], "argument -k: invalid int value"),
    ("search.cli", ["query", "--text", "a"], "the following arguments are required: --index"),
    ("search.cli", ["query", "--index", "index", "--text", "a", "--image", "x.jpg"], "x.jpg: file not found"),
    ("search.cli", ["query", "--index", "index", "--text", "a", "--weights", "1,2"], "gives 2 weights for 1 query"),
    ("search.cli", ["query", "--index", "index", "--minus-text", "a"], "at least one term with a positive weight"),
    ("search.cli", ["query", "--index", "index"], "give a query: --text, --image"),
    ("search.cli", ["query", "--index", "index", "--text", "a", "--cutoff", "2"], "cutoff must be auto, none or"),
    ("search.cli", ["query", "--index", "index", "--text", "a", "--after", "May"], "--after must be a date"),
    ("search.cli", ["lookup"], "invalid choice: 'lookup'"),
    ("indexer.cli", ["build", "--format", "karpathy", "--annotations", "missing.json", "--images", "images",
                     "--out", "new_index"], "missing.json"),
    ("indexer.cli", ["build", "--format", "folder", "--images", "images", "--out", "taken"],
     "taken is a non-empty directory that is not an index; choose another --out"),
    ("indexer.cli", ["build", "--format", "folder", "--images", "images", "--out", "index"],
     "index already exists; pass --overwrite to replace it"),
    ("indexer.cli", ["build", "--format", "parquet", "--images", "images", "--out", "x"], "invalid choice"),
    ("indexer.cli", ["info", "--index", "not_an_index"], "is not an index"),
    ("indexer.cli", ["update", "--index", "nowhere"], "no such index directory"),
    ("indexer.cli", ["finetune", "--format", "karpathy"], "the following arguments are required"),
    ("indexer.cli", ["finetune", "--format", "karpathy", "--annotations", "k.json", "--images", "images",
                     "--out", "taken"], "taken is a non-empty directory that is not a model folder"),
    ("indexer.cli", ["finetune", "--format", "karpathy", "--annotations", "missing.json", "--images", "images",
                     "--out", "new_model"], "missing.json"),
    ("web.__main__", [], "give --index INDEX"),
    ("web.__main__", ["--index", "not_an_index"], "is not an index"),
    ("web.__main__", ["--index", "index", "--port", "eighty"], "argument --port: invalid int value"),
]


@pytest.mark.parametrize("module,args,message", BAD_ARGUMENTS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_fail_in_one_line_before_torch(workdir, module, args, message):
    imported, code, err = run_main(module, args, cwd=workdir)
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not imported, f"{module} {args[:3]} imported torch before failing"


@pytest.mark.parametrize("module,args", [("search.cli", ["query", "--help"]), ("indexer.cli", ["build", "--help"]),
                                         ("indexer.cli", ["finetune", "--help"]), ("web.__main__", ["--help"])])
def test_help_needs_no_torch(workdir, module, args):
    imported, code, _ = run_main(module, args, cwd=workdir)
    assert code == 0 and not imported


def test_valid_query_runs_from_another_directory(workdir, tmp_path):
    """The whole path a user takes (python -m, relative paths), which does import torch and load the model."""
    done = subprocess.run([sys.executable, "-m", "search", "query", "--index", os.path.relpath(workdir / "index",
                           tmp_path), "--text", "a red circle", "-k", "3", "--json"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [hit["rank"] for hit in json.loads(done.stdout)["results"]] == [1, 2, 3]


# -- the fingerprint cache --------------------------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path, tiny_model_dir, monkeypatch):
    """A private copy of the tiny model (the tests rewrite it) and a private, empty fingerprint cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def load(folder: Path, **options) -> OpenClipEncoder:
    return create_encoder(EncoderSpec.from_args(f"local-dir:{folder}", None), "torch", **options)


class Counting:
    """Wraps a function, counting calls; `fail=True` makes every call an error."""

    def __init__(self, fn, fail: bool = False):
        self.fn, self.fail, self.calls = fn, fail, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail:
            raise AssertionError("should have come from the cache")
        return self.fn(*args, **kwargs)


def test_fingerprint_and_width_come_from_the_cache(model_dir, monkeypatch):
    first = load(model_dir)
    expected = _weights_fingerprint(first.model)  # oracle: hashing the tensors directly
    assert first.fingerprint == expected
    entries = json.loads(cache_path().read_text())
    assert [(e["fingerprint"], e["dim"]) for e in entries.values()] == [(expected, TINY_MODEL_CFG["embed_dim"])]

    for module in (openclip_encoder, loading):  # the loader hashes fp32 weights before it quantises them
        monkeypatch.setattr(module, "weights_fingerprint", Counting(_weights_fingerprint, fail=True))
    monkeypatch.setattr(OpenClipEncoder, "encode_texts", Counting(OpenClipEncoder.encode_texts, fail=True))
    second = load(model_dir)  # neither hashes nor runs the model to learn its width
    assert second.fingerprint == expected and second.dim == first.dim
    assert load(model_dir, precision="int8").fingerprint == expected  # fp32 weights' fingerprint, before quantising


def test_changed_weights_file_is_hashed_again(model_dir, monkeypatch):
    before = load(model_dir).fingerprint
    hashing = Counting(_weights_fingerprint)
    monkeypatch.setattr(openclip_encoder, "weights_fingerprint", hashing)

    changed = load(model_dir)
    with torch.no_grad():
        changed.model.logit_scale.add_(1.0)
    save_local_dir(changed, model_dir, TINY_MODEL_CFG)  # rewrites the weights file: new mtime
    after = load(model_dir)
    assert after.fingerprint == _weights_fingerprint(after.model) != before
    assert hashing.calls == 1  # the reload (the oracle is the unpatched function)

    weights = model_dir / WEIGHTS_FILE
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only: hashed again, same value
    assert load(model_dir).fingerprint == after.fingerprint and hashing.calls == 2

    # same size, and the old mtime put back: the change of ctime still tells
    data = bytearray(weights.read_bytes())
    stat = weights.stat()
    data[-1] ^= 0xFF  # the last byte of the last tensor's data
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    rewritten = load(model_dir)
    assert rewritten.fingerprint == _weights_fingerprint(rewritten.model) != after.fingerprint
    assert hashing.calls == 3


def test_fingerprint_follows_weights_changed_in_memory(model_dir):
    loaded = load(model_dir).fingerprint
    encoder = load(model_dir)
    with torch.no_grad():
        next(encoder.model.parameters()).mul_(0.5)  # as an optimiser step or load_state_dict would
    assert encoder.fingerprint == _weights_fingerprint(encoder.model) != loaded


def test_broken_or_unwritable_cache_is_only_slower(model_dir, tmp_path, monkeypatch):
    expected = load(model_dir).fingerprint
    cache_path().write_text("{not json")
    assert load(model_dir).fingerprint == expected
    assert [e["fingerprint"] for e in json.loads(cache_path().read_text()).values()] == [expected]  # rewritten
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))  # its folder cannot be created
    assert load(model_dir).fingerprint == expected


def test_random_weights_have_no_cache_key(tmp_path):
    """Weights drawn at random differ per load: nothing may be remembered for them."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG}))
    for spec in (EncoderSpec.from_args("ViT-B-32", "none"), EncoderSpec.from_args(f"local-dir:{folder}", None)):
        assert loading.cache_key(spec) is None
