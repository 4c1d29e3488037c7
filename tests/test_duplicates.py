"""`indexer duplicates --tier exact`: groups of byte-identical files, checked against hashlib over the files."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .helpers import make_pairs, write_images

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "indexer", *args], cwd=cwd, capture_output=True, text=True)


def test_exact_duplicates_match_the_files_hashes(tiny_model_spec, tmp_path):
    """As a user runs it: a photo folder with copies under other names and in other folders, indexed and asked from
    the folder above with relative paths; the groups equal those of SHA-1 over the files themselves."""
    photos = write_images(tmp_path / "photos", make_pairs(8, seed=4))
    (photos / "trip").mkdir()
    shutil.copy(photos / "img_001.png", photos / "trip" / "copy of img_001.png")
    shutil.copy(photos / "img_001.png", photos / "img_001 (2).png")
    shutil.copy(photos / "img_005.png", photos / "trip" / "img_005.png")
    built = run("build", "--format", "folder", "--images", "photos", "--out", "index", "--model", tiny_model_spec,
                "--quiet", cwd=tmp_path)
    assert built.returncode == 0, built.stderr

    found = run("duplicates", "--index", "index", "--json", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    report = json.loads(found.stdout)

    by_hash: dict[str, list[str]] = {}
    for path in sorted(p for p in photos.rglob("*.png")):
        by_hash.setdefault(hashlib.sha1(path.read_bytes()).hexdigest(), []).append(path.relative_to(photos).as_posix())
    expected = sorted(sorted(paths) for paths in by_hash.values() if len(paths) > 1)
    assert sorted(sorted(g["paths"]) for g in report["groups"]) == expected and len(expected) == 2
    assert report["redundant"] == 3 and report["images"] == 11
    sizes = {name: (photos / name).stat().st_size for name in ("img_001.png", "img_005.png")}
    assert report["redundant_bytes"] == 2 * sizes["img_001.png"] + sizes["img_005.png"]

    text = run("duplicates", "--index", "index", cwd=tmp_path)
    assert text.returncode == 0 and "2 group(s) of identical files among 11 images; 3 redundant" in text.stdout


def test_an_index_without_file_hashes_says_why(tiny_model_spec, tmp_path):
    photos = write_images(tmp_path / "photos", make_pairs(3, seed=4))
    assert run("build", "--format", "folder", "--images", str(photos), "--out", "index", "--model", tiny_model_spec,
               "--quiet", cwd=tmp_path).returncode == 0
    assert run("export", "--index", "index", "--out", "emb", cwd=tmp_path).returncode == 0
    assert run("build", "--format", "embeddings", "--embeddings", "emb", "--out", "bare", cwd=tmp_path).returncode == 0
    done = run("duplicates", "--index", "bare", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no file hashes" in lines[0]
