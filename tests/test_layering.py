"""The import layering: search/ at the bottom, indexer/ above it, web/ on top; command-line edges (cli.py,
__main__.py) import the library and nothing imports them; only the open_clip encoder module imports open_clip."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "indexer", "web")
ALLOWED = {"search": {"search"}, "indexer": {"search", "indexer"}, "web": {"search", "indexer", "web"}}
EDGES = ("cli", "__main__")


def _imports(path: Path):
    package = path.parent.name
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                base = package + ("." + base if base else "")
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _modules():
    return [(path, list(_imports(path))) for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))]


def test_lower_layers_never_import_higher_ones():
    wrong = [(str(p.relative_to(ROOT)), name) for p, names in _modules() for name in names
             if name.split(".")[0] in PACKAGES and name.split(".")[0] not in ALLOWED[p.parent.name]]
    assert wrong == []


def test_nothing_imports_a_command_line_edge():
    wrong = [(str(p.relative_to(ROOT)), name) for p, names in _modules() for name in names
             if name.split(".")[0] in PACKAGES and any(part in EDGES for part in name.split(".")[1:])
             and p.stem not in EDGES]
    edges_importing_edges = [(str(p.relative_to(ROOT)), name) for p, names in _modules() if p.stem in EDGES
                             for name in names if name.split(".")[0] in PACKAGES
                             and name.split(".")[:2] not in ([p.parent.name, "cli"],)
                             and any(part in EDGES for part in name.split(".")[1:])]
    assert wrong == [] and edges_importing_edges == []


def test_only_the_open_clip_module_imports_open_clip():
    importers = {str(p.relative_to(ROOT)) for p, names in _modules() if any(n.split(".")[0] == "open_clip"
                                                                            for n in names)}
    assert importers == {"search/openclip_encoder.py"}
