"""Indexer: dataset readers, the encode pipeline and the index writer.

`from indexer import build, update` (indexer/library.py) builds and updates indexes from Python; the names below are
loaded on first use, so `import indexer` stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {"build": "library", "update": "library", "plan_update": "library", "UpdatePlan": "library",
           "BuildConfig": "pipeline", "BuildReport": "pipeline", "build_index": "pipeline",
           "read_dataset": "readers", "Sample": "readers", "IndexOptions": None}
__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from search.index_choice import IndexOptions

    from .library import UpdatePlan, build, plan_update, update
    from .pipeline import BuildConfig, BuildReport, build_index
    from .readers import Sample, read_dataset


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    module = _PUBLIC[name]
    source = importlib.import_module("search.index_choice" if module is None else f".{module}", __name__)
    value = getattr(source, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
