"""Installable: `pip install .` gives console scripts that work from any directory, with the web app's templates and
static files and the demo's model config inside the installed packages; the declared dependencies are
requirements.txt's pins."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from search.cli_common import CONSOLE_SCRIPTS

from .helpers import make_pairs, write_images, write_karpathy

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_lines(path: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {line for line in lines if line}


def test_dependencies_are_requirements_pins_and_scripts_are_documented():
    project = PYPROJECT["project"]
    extras = {req for group in project["optional-dependencies"].values() for req in group
              if not req.startswith(project["name"])}
    assert set(project["dependencies"]) | extras == _requirement_lines(ROOT / "requirements.txt")
    assert "torch==2.14.1" in project["dependencies"]  # pip install . keeps install.sh's torch
    scripts = project["scripts"]
    assert {name: f"python -m {target.split('.')[0]}" for name, target in scripts.items()} == CONSOLE_SCRIPTS
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in scripts)


def _run(argv: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pip_install_gives_commands_that_work_anywhere(tmp_path, tiny_model_spec):
    # install a copy: building writes build/ and *.egg-info beside the sources
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in sorted({name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]}):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    # the system's torch, open_clip, setuptools and pip serve the venv: no network, no second torch
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    installed = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                      source], tmp_path, env)
    assert installed.returncode == 0, installed.stderr

    elsewhere = tmp_path / "elsewhere"
    pairs = make_pairs(8, seed=11)
    write_images(elsewhere / "photos", pairs)
    write_karpathy(elsewhere / "captions.json", pairs, ["test"] * len(pairs))
    for script in CONSOLE_SCRIPTS:
        shown = _run([bin_dir / script, "--help"], elsewhere, env)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {script}"), shown.stderr

    built = _run([bin_dir / "retrieval-index", "build", "--format", "karpathy", "--annotations", "captions.json",
                  "--images", "photos", "--out", "index", "--model", tiny_model_spec, "--quiet"], elsewhere, env)
    assert built.returncode == 0, built.stderr
    query = ["query", "--index", "index", "--text", f"a {pairs[0][2][1]} {pairs[0][2][0]}", "-k", "3", "--json"]
    found = _run([bin_dir / "retrieval-search", *query], elsewhere, env)
    assert found.returncode == 0, found.stderr
    # oracle: the same query through `python -m search` of the working tree
    reference = _run([sys.executable, "-m", "search", *query[:2], elsewhere / "index", *query[3:]], ROOT,
                     {**env, "PYTHONPATH": str(ROOT)})
    assert json.loads(found.stdout) == json.loads(reference.stdout) and len(json.loads(found.stdout)["results"]) == 3
    refused = _run([bin_dir / "retrieval-search", "query", "--index", "index", "--text", ""], elsewhere, env)
    assert refused.returncode == 1 and refused.stderr == "error: empty text query\n"

    served = _run([python, "-c", """
import json, web, demo.prepare
from web import create_app
client = create_app(index="index").test_client()
page, script = client.get("/"), client.get("/static/app.js")
print(json.dumps({"web": web.__file__, "page": page.status_code, "has_form": b'id="q"' in page.data,
                  "script": script.status_code, "demo_config": demo.prepare.DEMO_MODEL_CONFIG.is_file(),
                  "demo_config_path": str(demo.prepare.DEMO_MODEL_CONFIG)}))
"""], elsewhere, env)
    assert served.returncode == 0, served.stderr
    report = json.loads(served.stdout.strip().splitlines()[-1])
    site = str(venv)
    assert report["web"].startswith(site) and report["demo_config_path"].startswith(site)  # the installed copy
    assert report["page"] == 200 and report["has_form"] and report["script"] == 200 and report["demo_config"]
