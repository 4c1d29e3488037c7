"""Only the allow-listed decoders run: files in any other format Pillow knows (EPS, PSD, ICO, …), even named
photo.jpg, are refused with a one-line reason naming the format, skipped by a build and answered 400 on upload, and
neither Ghostscript nor any refused format's parser is ever started."""
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from search.errors import ImageReadError
from search.images import ALLOWED_FORMATS, load_image
from web import create_app
from web.config import WebConfig

from .helpers import build_test_index, make_pairs

ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 12)


def _pillow_writes(fmt, mode="RGB"):
    def write():
        buffer = io.BytesIO()
        Image.new("RGB", SIZE, (200, 10, 10)).convert(mode).save(buffer, fmt)
        return buffer.getvalue()
    return write


def _psd():
    """A minimal valid RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    w, h = SIZE
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)  # version 1, 3 channels, 8 bits, RGB
    sections = struct.pack(">III", 0, 0, 0)  # empty colour mode data, image resources, layers
    return header + sections + struct.pack(">H", 0) + bytes((i * 7) % 256 for i in range(3 * w * h))  # raw data


def _eps():
    data = _pillow_writes("EPS")()  # Pillow writes EPS itself; only reading needs Ghostscript
    assert data.startswith(b"%!PS-Adobe")
    return data


# Formats Pillow decodes (without an allow-list) that we refuse; each file is named as a JPEG
NAMED = {"EPS": _eps, "PSD": _psd, "ICO": _pillow_writes("ICO"), "PCX": _pillow_writes("PCX"),
         "PPM": _pillow_writes("PPM"), "SGI": _pillow_writes("SGI"), "IM": _pillow_writes("IM"),
         "DDS": _pillow_writes("DDS"), "MSP": _pillow_writes("MSP", "1"), "XBM": _pillow_writes("XBM", "1"),
         "QOI": _pillow_writes("QOI"), "JPEG2000": _pillow_writes("JPEG2000"), "ICNS": _pillow_writes("ICNS")}
# Formats without a signature: refused all the same (no decoder outside the allow-list is even tried), but they can
# only be described as unrecognised
UNNAMED = {"TGA": _pillow_writes("TGA"), "SPIDER": _pillow_writes("SPIDER", "F")}


def write_refused(folder: Path) -> dict:
    """Every refused file as `<format>.jpg` in `folder`; {file name: format}."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for fmt, make in {**NAMED, **UNNAMED}.items():
        (folder / f"{fmt.lower()}.jpg").write_bytes(make())
        names[f"{fmt.lower()}.jpg"] = fmt
    return names


@pytest.fixture
def refused(tmp_path):
    return tmp_path, write_refused(tmp_path)


@pytest.fixture
def decoders_watched(monkeypatch):
    """Records every refused format's opener and Ghostscript if anything starts them (and stops Ghostscript)."""
    started = []
    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt not in ALLOWED_FORMATS:
            def watched(*args, fmt=fmt, factory=factory):
                started.append(fmt)
                return factory(*args)
            monkeypatch.setitem(Image.OPEN, fmt, (watched, accept))

    def ghostscript(*args, **kwargs):
        started.append("Ghostscript")
        raise OSError("Ghostscript must never run")
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    return started


def test_pillow_would_decode_every_refused_file(refused):
    """The oracle: without an allow-list Pillow recognises each file (and decodes all but EPS, which needs gs)."""
    folder, names = refused
    for name, fmt in names.items():
        with Image.open(folder / name) as image:
            assert image.format == fmt and image.size[0] > 0
            if fmt != "EPS":
                image.load()


def test_load_image_refuses_other_formats_by_name(refused, decoders_watched):
    folder, names = refused
    allowed = ", ".join(ALLOWED_FORMATS)
    for name, fmt in names.items():
        for source in (folder / name, (folder / name).read_bytes()):
            with pytest.raises(ImageReadError) as error:
                load_image(source)
            message = str(error.value)
            assert "\n" not in message and f"allowed: {allowed}" in message
            if fmt in NAMED:
                assert f"unsupported image format ({fmt})" in message
            else:
                assert "not an image file (format not recognised" in message
    assert decoders_watched == []  # no refused parser, no Ghostscript
    with Image.open(folder / "eps.jpg") as image:  # the watch works: plain Pillow starts both
        with pytest.raises(OSError):
            image.load()
    assert decoders_watched == ["EPS", "Ghostscript"]


def test_allow_list_is_what_the_readme_promises():
    assert ALLOWED_FORMATS[:6] == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    assert set(ALLOWED_FORMATS) <= {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"}
    assert all(fmt in Image.OPEN for fmt in ALLOWED_FORMATS)  # HEIF/AVIF only when their plug-in is registered


def test_a_pre_opened_refused_image_is_not_decoded(refused, decoders_watched):
    folder, _ = refused
    with Image.open(folder / "eps.jpg") as image:  # a caller's lazily opened image: load() would start gs
        with pytest.raises(ImageReadError, match=r"unsupported image format \(EPS\)"):
            load_image(image)
    assert "Ghostscript" not in decoders_watched


def _fake_gs(tmp_path):
    """A `gs` first on PATH that leaves a marker file if anything runs it."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-was-run"
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\necho 10.0\n")
    gs.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return env, marker


def test_cli_build_skips_refused_files_and_never_runs_ghostscript(tmp_path, tiny_model_spec):
    photos = tmp_path / "photos"
    names = write_refused(photos)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photos / "real.jpg")
    env, marker = _fake_gs(tmp_path)
    result = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "folder", "--images", "photos",
                             "--out", "index", "--model", tiny_model_spec, "--quiet"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["n_images"] == 1
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(reasons) == sorted(names)
    for name, fmt in names.items():
        expected = f"unsupported image format ({fmt})" if fmt in NAMED else "format not recognised"
        assert expected in reasons[name] and "allowed: JPEG, PNG" in reasons[name]
    assert not marker.exists(), "Ghostscript was run during the build"
    # the fake gs is really found: plain Pillow decoding the same file runs it
    subprocess.run([sys.executable, "-c", "from PIL import Image\ntry: Image.open('photos/eps.jpg').load()\n"
                    "except Exception: pass"], cwd=tmp_path, env=env, timeout=60)
    assert marker.exists()


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_spec):
    index = build_test_index(tmp_path_factory.mktemp("web_refused"), make_pairs(6, seed=3), tiny_model_spec)
    return create_app(WebConfig(index=index, max_upload_mb=1)).test_client()


def test_upload_of_a_refused_format_is_a_400(client, refused, decoders_watched):
    folder, names = refused
    for name, fmt in names.items():
        response = client.post("/api/search/image",
                               data={"image": (io.BytesIO((folder / name).read_bytes()), "photo.jpg")})
        assert response.status_code == 400, name
        error = response.get_json()["error"]
        assert ("unsupported image format" if fmt in NAMED else "not an image file") in error
        assert "\n" not in error
    assert decoders_watched == []


def test_documents_and_text_are_not_images(decoders_watched):
    assert "not an image file (PDF; allowed: JPEG" in _message(b"%PDF-1.4\n%...")
    assert "not an image file (format not recognised; allowed: JPEG" in _message(b"just some text")
    assert "broken PNG header" in _message(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)  # an allowed format, damaged
    assert decoders_watched == []


def _message(data: bytes) -> str:
    with pytest.raises(ImageReadError) as error:
        load_image(data)
    return str(error.value)
