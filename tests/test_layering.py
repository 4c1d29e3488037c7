"""The import layering: search/ at the bottom, indexer/ above it, demo/ above that; the web app depends on search/
alone (only its `__main__` edge reaches the demo); command-line edges (cli.py, __main__.py) import the library and
nothing imports them; only the open_clip encoder package imports open_clip."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "indexer", "demo", "web")
ALLOWED = {"search": {"search"}, "indexer": {"search", "indexer"}, "demo": {"search", "indexer", "demo"},
           "web": {"search", "web"}}
EDGE_ALLOWED = {"web/__main__.py": {"demo"}}  # `python -m web --demo` prepares the demo, then serves it like any index
EDGES = ("cli", "__main__")
OPEN_CLIP_PACKAGE = "search/openclip"


def _top(path: Path) -> str:
    """The top-level package a module belongs to (search/openclip/loading.py → search)."""
    return path.relative_to(ROOT).parts[0]


def _imports(path: Path):
    package = ".".join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package (each extra dot one package up)
                parent = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = parent + ("." + base if base else "")
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _modules():
    return [(path, list(_imports(path))) for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def test_lower_layers_never_import_higher_ones():
    wrong = [(str(p.relative_to(ROOT)), name) for p, names in _modules() for name in names
             if name.split(".")[0] in PACKAGES
             and name.split(".")[0] not in ALLOWED[_top(p)] | EDGE_ALLOWED.get(p.relative_to(ROOT).as_posix(), set())]
    assert wrong == []


def test_the_web_app_depends_on_search_alone():
    reached = {(p.relative_to(ROOT).as_posix(), name.split(".")[0]) for p, names in _modules() if _top(p) == "web"
               for name in names if name.split(".")[0] in ("indexer", "demo")}
    assert reached == {("web/__main__.py", "demo")}  # the edge's lazy import is seen; nothing else in web/ reaches up


def test_nothing_imports_a_command_line_edge():
    wrong = [(str(p.relative_to(ROOT)), name) for p, names in _modules() for name in names
             if name.split(".")[0] in PACKAGES and any(part in EDGES for part in name.split(".")[1:])
             and p.stem not in EDGES]
    edges_importing_edges = [(str(p.relative_to(ROOT)), name) for p, names in _modules() if p.stem in EDGES
                             for name in names if name.split(".")[0] in PACKAGES
                             and name.split(".")[:2] not in ([_top(p), "cli"],)
                             and any(part in EDGES for part in name.split(".")[1:])]
    assert wrong == [] and edges_importing_edges == []


def test_only_the_open_clip_package_imports_open_clip():
    importers = {p.relative_to(ROOT).as_posix() for p, names in _modules() if any(n.split(".")[0] == "open_clip"
                                                                                  for n in names)}
    assert importers and all(path.startswith(OPEN_CLIP_PACKAGE + "/") for path in importers)


def test_only_the_catalog_module_runs_sql():
    importers = {p.relative_to(ROOT).as_posix() for p, names in _modules() if "sqlite3" in names}
    assert importers == {"search/catalog.py"}
    sql = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP)\b.*\b(FROM|INTO|TABLE|SET|INDEX)\b")
    writers = {p.relative_to(ROOT).as_posix() for p, _ in _modules()
               for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and sql.search(node.value)}
    assert writers == {"search/catalog.py"}  # connections handed out (writer.catalog.conn) run no SQL elsewhere


def test_only_the_layout_module_spells_the_names_of_an_index_files():
    """manifest.json, .NAME.partial, … appear as string literals in search/layout.py alone (f-string parts count)."""
    from search import layout
    spelled = {*layout.INDEX_FILES, layout.PROGRESS_NAME, *layout.RAW_VECTOR_FILES.values(),
               *(f".{role}" for role in (layout.PARTIAL, layout.LOCK, layout.THUMBNAILS))}
    found = {(p.relative_to(ROOT).as_posix(), node.value) for p, _ in _modules()
             for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and node.value in spelled}
    assert {path for path, _ in found} == {"search/layout.py"}


TORCH_FREE = ("search/onnxrt/", "search/pixels.py", "search/clip_tokenizer.py")  # the ONNX Runtime query path


def test_the_onnx_runtime_path_imports_no_torch():
    heavy = {"torch", "torchvision", "open_clip", "timm"}
    found = {(p.relative_to(ROOT).as_posix(), n) for p, names in _modules() for n in names
             if p.relative_to(ROOT).as_posix().startswith(TORCH_FREE)
             and (n.split(".")[0] in heavy or n.startswith("search.openclip") and "exports" not in p.name)}
    # exports.py reaches search.openclip.export only when torch is in the process already (an in-process export)
    assert found == set()
