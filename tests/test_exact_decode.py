"""Exact decoding by default: the pixels a build feeds the model equal open_clip's reference preprocessing of the
fully decoded file, and the catalog records each file's true size. `--fast-decode` (JPEG draft) stays an opt-in that
update and resume honour."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image, ImageOps

from indexer import writer as writer_module
from indexer.cli import main as indexer_main
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import Sample
from search.encoders import EncoderSpec, create_encoder
from search.images import load_image
from search.openclip.local_dir import init_local_dir
from search.store import open_index

from .helpers import TINY_MODEL_CFG

ROOT = Path(__file__).resolve().parents[1]
# A model with a photo-sized input, so open_clip's resize really works (the tiny model's input is 32 px)
MODEL_224_CFG = {**TINY_MODEL_CFG,
                 "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16}}
ROTATE_90 = 6  # EXIF orientation: rotate 90° clockwise on display


def _orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def photo(path: Path, size, seed: int, **save_args) -> Path:
    """A photo-like image: colour gradients plus sensor noise, JPEG at quality 90 (or PNG by extension)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = (np.linspace(0, 1, w)[None, :, None] * rng.uniform(-80, 80, 3)
            + np.linspace(0, 1, h)[:, None, None] * rng.uniform(-60, 60, 3))
    pixels = np.clip(rng.uniform(60, 190, 3) + ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    if path.suffix == ".jpg":
        save_args.setdefault("quality", 90)
    Image.fromarray(pixels).save(path, **save_args)
    return path


PHOTOS = {  # name: (stored size, EXIF orientation)
    "wide.jpg": ((384, 191), None),
    "big.jpg": ((641, 479), None),
    "big.png": ((641, 479), None),
    "rotated.jpg": ((384, 191), ROTATE_90),
}
UPRIGHT = {"wide.jpg": (384, 191), "big.jpg": (641, 479), "big.png": (641, 479), "rotated.jpg": (191, 384)}


def write_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, (size, orientation)) in enumerate(PHOTOS.items()):
        photo(folder / name, size, seed, **({"exif": _orientation(orientation)} if orientation else {}))
    return folder


def reference_image(path: Path) -> Image.Image:
    """What open_clip users write: Image.open(p).convert("RGB"). We store images upright, so for the file with an
    EXIF orientation the reference is ImageOps.exif_transpose(Image.open(p)).convert("RGB")."""
    if PHOTOS[path.name][1]:
        return ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def model_224(tmp_path_factory):
    return init_local_dir(MODEL_224_CFG, tmp_path_factory.mktemp("model_224"), seed=0)


@pytest.fixture(scope="module")
def encoders(model_224, tiny_model_spec):
    """(our encoder, open_clip's own preprocess from create_model_and_transforms) per input size."""
    pairs = {}
    for spec in (tiny_model_spec, f"local-dir:{model_224}"):
        encoder = create_encoder(EncoderSpec.from_args(spec, None))
        pairs[encoder.image_size] = (encoder, open_clip.create_model_and_transforms(spec)[2])
    assert sorted(pairs) == [32, 224]
    return pairs


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_default_decoding_equals_open_clip_preprocessing(photos, encoders, name, size):
    encoder, preprocess = encoders[size]
    ours = encoder.preprocess_image(load_image(photos / name))
    reference = preprocess(reference_image(photos / name)).numpy()
    assert ours.shape == reference.shape == (3, size, size)
    assert float(np.abs(ours - reference).max()) <= 1e-6
    fast = encoder.preprocess_image(load_image(photos / name, min_side=size))
    if name.endswith(".jpg") and min(UPRIGHT[name]) >= 2 * size:  # draft reduces only by powers of two
        assert float(np.abs(fast - reference).max()) > 1e-3  # the opt-in really decodes differently


def test_built_vectors_match_open_clip_and_fast_decode_differs(photos, encoders, tmp_path):
    encoder, preprocess = encoders[224]
    samples = [Sample(name) for name in sorted(PHOTOS)]
    reference = encoder.encode_pixels(np.stack([preprocess(reference_image(photos / s.image)).numpy()
                                                for s in samples]))
    exact = tmp_path / "exact"
    build_index(samples, photos, encoder, exact, BuildConfig(progress=False, workers=2))
    np.testing.assert_allclose(np.load(exact / "image_vectors.npy"), reference, atol=1e-5)
    fast = tmp_path / "fast"
    build_index(samples, photos, encoder, fast, BuildConfig(progress=False, fast_decode=True))
    vectors = np.load(fast / "image_vectors.npy")
    big = [s.image for s in samples].index("big.jpg")  # 641x479: decoded at half scale for a 224 model
    assert np.abs(vectors[big] - reference[big]).max() > 1e-4
    assert float(np.sum(vectors * reference, axis=1).min()) > 0.99  # close, not equal
    assert json.loads((fast / "manifest.json").read_text())["fast_decode"] is True
    assert json.loads((exact / "manifest.json").read_text())["fast_decode"] is False


def _catalog_sizes(index: Path) -> dict:
    return {r.path: (r.width, r.height) for r in open_index(index).catalog.all_images()}


def test_cli_records_true_sizes_and_update_keeps_fast_decode(tmp_path, tiny_model_spec, tiny_encoder):
    write_photos(tmp_path / "photos")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for out, extra in (("exact", []), ("fast", ["--fast-decode"])):
        result = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", "photos",
                                 "--out", out, "--model", tiny_model_spec, "--quiet", *extra],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        # the true upright size of each file, fast decode or not (draft decoding once stored 384x192)
        assert _catalog_sizes(tmp_path / out) == UPRIGHT
    assert json.loads((tmp_path / "fast" / "manifest.json").read_text())["fast_decode"] is True

    added = photo(tmp_path / "photos" / "added.jpg", (643, 481), seed=9)
    assert indexer_main(["update", "--index", str(tmp_path / "fast"), "--quiet"]) == 0
    index = open_index(tmp_path / "fast")
    assert index.manifest.fast_decode is True
    record = next(r for r in index.catalog.all_images() if r.path == "added.jpg")
    assert (record.width, record.height) == (643, 481)
    stored = index.vectors("images")[record.id]
    fast = tiny_encoder.encode_images([load_image(added, min_side=tiny_encoder.image_size)])[0]
    exact = tiny_encoder.encode_images([load_image(added)])[0]
    assert np.abs(stored - fast).max() < 1e-5 < np.abs(stored - exact).max()


def test_resume_requires_the_same_decode_choice(tmp_path, tiny_model_spec, monkeypatch, capsys):
    photos = write_photos(tmp_path / "photos")
    photo(photos / "more.jpg", (97, 65), seed=7)
    out = tmp_path / "index"
    build = ["build", "--format", "folder", "--images", str(photos), "--out", str(out), "--model", tiny_model_spec,
             "--batch-size", "2", "--workers", "1", "--quiet"]
    real_checkpoint = writer_module.IndexWriter.checkpoint

    def interrupted(self, *a):
        real_checkpoint(self, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.IndexWriter, "checkpoint", interrupted)
    assert indexer_main(build + ["--fast-decode"]) == 130
    monkeypatch.setattr(writer_module.IndexWriter, "checkpoint", real_checkpoint)
    capsys.readouterr()
    assert indexer_main(build + ["--resume"]) == 1  # exact decoding now: other arguments, refused
    assert "used other arguments" in capsys.readouterr().err
    assert indexer_main(build + ["--resume", "--fast-decode"]) == 0
    assert open_index(out).manifest.fast_decode is True


def test_manifests_without_the_field_read_as_exact(tmp_path, tiny_model_spec):
    out = tmp_path / "index"
    assert indexer_main(["build", "--format", "folder", "--images", str(write_photos(tmp_path / "photos")),
                         "--out", str(out), "--model", tiny_model_spec, "--quiet"]) == 0
    data = json.loads((out / "manifest.json").read_text())
    del data["fast_decode"]  # an index written before the option existed
    (out / "manifest.json").write_text(json.dumps(data))
    assert open_index(out).manifest.fast_decode is False
