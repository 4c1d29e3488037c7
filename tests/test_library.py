"""The library API as README.md shows it: its Python example run as a script from another directory (with the tiny
model in place of ViT-B-32, which cannot be downloaded here), the public names, and imports that stay light."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import search
import indexer

from .helpers import make_pairs, write_images

ROOT = Path(__file__).resolve().parents[1]


def readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    return next(b for b in blocks if "from indexer import" in b and "Searcher.open" in b)


def test_the_readme_library_example_runs_as_written(tmp_path, tiny_model_spec):
    work = tmp_path / "work"
    write_images(work / "photos" / "2024", make_pairs(10, seed=6))
    example = readme_python()
    assert '"ViT-B-32"' in example
    (work / "example.py").write_text(example.replace('"ViT-B-32"', repr(tiny_model_spec)))
    done = subprocess.run([sys.executable, "example.py"], cwd=work, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("indexed 10 images") and (work / "indexes" / "photos" / "manifest.json").is_file()
    assert "Traceback" not in done.stderr


def test_public_names_resolve_lazily_and_imports_stay_light():
    for package in (search, indexer):
        for name in package.__all__:
            assert getattr(package, name) is not None
    done = subprocess.run([sys.executable, "-c", "import sys, search, indexer; "
                           "print(sorted(m for m in ('faiss', 'numpy', 'torch', 'sqlite3') if m in sys.modules))"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def _unannotated(function, owner: str) -> list[str]:
    signature = inspect.signature(function)
    missing = [p.name for p in signature.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if signature.return_annotation is inspect.Signature.empty and function.__name__ != "__init__":
        missing.append("return")
    return [f"{owner}.{function.__name__}: {name}" for name in missing]


def test_the_public_api_is_fully_annotated():
    """Every public function, and every public method of a public class, annotates each parameter and its return."""
    gaps = []
    for package in (search, indexer):
        for name in package.__all__:
            public = getattr(package, name)
            if inspect.isfunction(public):
                gaps += _unannotated(public, package.__name__)
            elif inspect.isclass(public) and not issubclass(public, Exception):
                for attr, member in vars(public).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if inspect.isfunction(function):
                        gaps += _unannotated(function, f"{package.__name__}.{name}")
    assert gaps == []
