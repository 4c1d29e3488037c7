"""`python -m search models`: the recommended models with their published recall (each number's source named), the
CPU speed measured here, and the arguments to pass. open_clip's registry is the oracle for names, tags and shapes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest

from search.model_catalog import CATALOG, LANGUAGES, SOURCES, SPEEDS_FILE, Speed, Speeds, format_rate, format_table, \
    load_speeds, model_names, models

ROOT = Path(__file__).resolve().parents[1]


def run_models(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search", "models", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _row_line(stdout: str, entry) -> str:
    lines = [line for line in stdout.splitlines() if line.rstrip().endswith(entry.args)]
    assert len(lines) == 1, f"{entry.args}: {len(lines)} table rows"
    return lines[0]


def test_the_command_prints_every_catalog_row_with_its_numbers():
    done = run_models()
    assert done.returncode == 0, done.stderr
    speeds = load_speeds()
    for entry in CATALOG:
        line = _row_line(done.stdout, entry)
        assert line.startswith(entry.model + " ") and f" {entry.pretrained} " in line and f" {entry.dim} " in line
        if entry.coco is not None:
            assert f"{entry.coco.t2i_r1:.1f} / {entry.coco.i2t_r1:.1f}" in line
        if entry.xm3600 is not None:
            assert f"{entry.xm3600.t2i_r1:.1f} ({entry.xm3600.t2i_r1_zh:.1f})" in line
        speed = speeds.models.get(entry.model)
        if speed is not None and speed.images_per_s is not None:
            assert f" {format_rate(speed.images_per_s)} " in line
    for key in {e.source for e in CATALOG} | {e.xm3600_source for e in CATALOG}:
        assert key is None or f"{key}: {SOURCES[key]}" in done.stdout  # the legend cites every source the rows use


def test_json_has_every_row_and_field():
    done = run_models("--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(m["model"], m["pretrained"]) for m in report["models"]] == [(e.model, e.pretrained) for e in CATALOG]
    for row, entry in zip(report["models"], CATALOG):
        assert set(row) >= {"model", "pretrained", "family", "languages", "dim", "image_size", "flickr30k", "coco",
                            "xm3600", "source", "source_text", "xm3600_source", "speed", "args", "note"}
        assert row["args"] == f"--model {entry.model} --pretrained {entry.pretrained}"
        if entry.coco is not None:
            assert row["coco"]["t2i_r1"] == entry.coco.t2i_r1 and row["source_text"] == SOURCES[entry.source]
    assert report["sources"] == SOURCES
    assert set(report["speeds_measured"]) == {"machine", "date", "method"}


def test_language_filter_from_another_directory(tmp_path):
    done = run_models("--language", "multilingual", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = [(m["model"], m["pretrained"]) for m in json.loads(done.stdout)["models"]]
    assert listed == [(e.model, e.pretrained) for e in CATALOG if e.languages == "multilingual"]
    assert {"nllb-clip-base-siglip", "xlm-roberta-base-ViT-B-32", "ViT-B-16-SigLIP-i18n-256",
            "ViT-B-16-SigLIP2"} <= {name for name, _ in listed}
    assert "--model ViT-B-32 --pretrained laion2b_s34b_b79k" not in run_models("--language", "multilingual").stdout
    assert models("en") == list(CATALOG)  # every model reads English


def test_bad_language_is_one_line_exit_1():
    done = run_models("--language", "klingon")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


def test_listing_models_imports_no_torch():
    code = "import sys; from search.cli import main; main(['models']); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: f"{e.model}:{e.pretrained}")
def test_catalog_agrees_with_open_clips_registry(entry):
    assert entry.model in open_clip.list_models()
    assert entry.pretrained in open_clip.list_pretrained_tags_by_model(entry.model)
    config = open_clip.get_model_config(entry.model)
    assert entry.dim == config["embed_dim"]
    size = config["vision_cfg"]["image_size"]
    assert entry.image_size == (size if isinstance(size, int) else size[0])
    assert entry.languages in LANGUAGES


@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: f"{e.model}:{e.pretrained}")
def test_every_number_names_its_source(entry):
    assert entry.flickr30k or entry.coco or entry.xm3600, "a row without any published recall"
    if entry.flickr30k or entry.coco:
        assert entry.source in SOURCES
    if entry.xm3600:
        assert entry.xm3600_source in SOURCES and entry.languages == "multilingual"
    for recall in (entry.flickr30k, entry.coco):
        for value in (vars(recall).values() if recall else ()):
            assert value is None or 0 < value <= 100
    if entry.xm3600:
        assert all(0 < v <= 100 for v in vars(entry.xm3600).values())
        assert entry.xm3600.t2i_r1 < entry.xm3600.t2i_r5


def test_speeds_file_rows_match_catalog_names():
    speeds = load_speeds()
    assert SPEEDS_FILE.is_file() and speeds.machine and speeds.date and speeds.method
    assert set(speeds.models) == set(model_names())
    for name, speed in speeds.models.items():
        if speed.images_per_s is None:
            assert speed.note.startswith("not measured")
        else:
            assert speed.images_per_s > 0 and speed.text_ms > 0 and speed.image_batch > 0 and speed.image_batches > 0


def test_without_a_speeds_file_the_table_says_not_measured(tmp_path):
    speeds = load_speeds(tmp_path / "missing.json")
    assert speeds == Speeds()
    table = format_table(models(), speeds)
    assert "run `python -m benchmarks.model_speed`" in table
    measured = Speeds("m", "2025-01-01", "how", {"ViT-B-32": Speed(12.5, 20.0, 32, 3)})
    path = tmp_path / "speeds.json"
    path.write_text(json.dumps(measured.to_json()))
    assert load_speeds(path) == measured


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("## Choosing a model"):readme.index("## Runtimes")]


def test_readme_commands_run_verbatim(tmp_path):
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", _readme_section(), re.S))
    commands = [line.split("#")[0].split() for line in blocks.splitlines() if line.startswith("python -m search models")]
    assert len(commands) == 3
    for command in commands:
        assert run_models(*command[4:], cwd=tmp_path).returncode == 0, command


def test_readme_table_agrees_with_the_catalog_and_speeds():
    speeds = load_speeds()
    rows = re.findall(r"^\| `([^`]+)` / `([^`]+)`[^|]*\|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|", _readme_section(), re.M)
    rows = [row for row in rows if row[0] != "--model"]  # the header
    assert len(rows) >= 8
    for model, pretrained, flickr, coco, rate, text_ms in rows:
        entry = next(e for e in CATALOG if (e.model, e.pretrained) == (model, pretrained))
        assert coco.strip() == f"{entry.coco.t2i_r1:.1f} / {entry.coco.i2t_r1:.1f}"
        assert flickr.strip() == (f"{entry.flickr30k.t2i_r1:.1f} / {entry.flickr30k.i2t_r1:.1f}" if entry.flickr30k
                                  else "–")
        assert rate.strip() == format_rate(speeds.models[model].images_per_s)
        assert text_ms.strip() == f"{speeds.models[model].text_ms:.0f}"
