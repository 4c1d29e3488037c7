"""A folder holding every awkward kind of file: exactly the readable images get indexed, the rest are listed with
a reason."""
import json

import numpy as np
from PIL import Image

from indexer.cli import main as indexer_main
from search.images import load_image


def make_awkward_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    readable = {
        "cmyk.jpg": lambda p: photo.convert("CMYK").save(p),
        "grey.png": lambda p: photo.convert("L").save(p),
        "sixteen_bit.png": lambda p: Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(p),
        "palette.gif": lambda p: photo.convert("P").save(p),
        "alpha.png": lambda p: photo.convert("RGBA").save(p),
        "photo.webp": lambda p: photo.save(p, "WEBP"),
        "progressive.jpg": lambda p: photo.save(p, "JPEG", progressive=True),
        "animated.gif": lambda p: photo.save(p, save_all=True, append_images=[photo.rotate(90)], duration=100),
        "rotated.jpg": lambda p: photo.save(p, exif=_orientation(6)),
        "nested/deeper/plain.bmp": lambda p: photo.save(p),
    }
    broken = {
        "empty.jpg": lambda p: p.write_bytes(b""),
        "text_pretending.png": lambda p: p.write_text("this is not an image"),
        "truncated.jpg": lambda p: (photo.save(p), p.write_bytes(p.read_bytes()[:300])),
        "bomb.png": lambda p: Image.new("1", (12000, 12000)).save(p),
    }
    for name, write in {**readable, **broken}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write(root / name)
    (root / ".hidden").mkdir()
    photo.save(root / ".hidden" / "secret.jpg")
    (root / "notes.txt").write_text("not an image extension: never considered")
    return sorted(readable), sorted(broken)


def _orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_awkward_folder_indexes_exactly_the_readable_images(tmp_path, tiny_model_spec, caplog):
    readable, broken = make_awkward_folder(tmp_path / "photos")
    out = tmp_path / "index"
    assert indexer_main(["build", "--format", "folder", "--images", str(tmp_path / "photos"), "--out", str(out),
                         "--model", tiny_model_spec, "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    import sqlite3
    with sqlite3.connect(out / "catalog.sqlite") as db:
        indexed = sorted(row[0] for row in db.execute("SELECT path FROM images"))
        sizes = dict(db.execute("SELECT path, width || 'x' || height FROM images"))
    assert indexed == readable
    assert sorted(s["path"] for s in manifest["skipped"]) == broken
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert "empty file" in reasons["empty.jpg"] and "not an image" in reasons["text_pretending.png"]
    assert "cannot decode" in reasons["truncated.jpg"] and "over the limit" in reasons["bomb.png"]
    assert sizes["rotated.jpg"] == "60x80"  # EXIF orientation applied: stored upright
    skip_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert all(sum(name in line for line in skip_lines) == 1 for name in broken)  # one line each
    assert all("\n" not in line for line in skip_lines)

    assert indexer_main(["build", "--format", "folder", "--images", str(tmp_path / "photos"), "--out",
                         str(tmp_path / "with_hidden"), "--include-hidden", "--model", tiny_model_spec,
                         "--quiet"]) == 0
    with sqlite3.connect(tmp_path / "with_hidden" / "catalog.sqlite") as db:
        assert ".hidden/secret.jpg" in {row[0] for row in db.execute("SELECT path FROM images")}


def test_sixteen_bit_grey_keeps_its_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16)[None].repeat(4, 0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = np.asarray(load_image(tmp_path / "ramp.png"))
    assert pixels[0, 0, 0] < 5 and pixels[0, -1, 0] > 250  # scaled to 8 bits, not clipped to white
