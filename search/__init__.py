"""Search core: encoders, index storage, FAISS wrapper, Searcher and retrieval metrics.

The public names below are importable from the package (`from search import Searcher, Query, Term`); each is
loaded on first use, so `import search` (and the command line's argument checks) stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name → the module that defines it
_PUBLIC = {
    "Searcher": "searcher", "SearchConfig": "searcher", "Hit": "searcher", "Results": "searcher",
    "IndexedImage": "searcher",
    "Query": "query", "Term": "query", "Filters": "query",
    "open_index": "store", "StoredIndex": "store",
    "Encoder": "encoders", "EncoderSpec": "encoders", "create_encoder": "encoders",
    "evaluate": "evaluation", "per_query": "per_query", "PerQuery": "per_query", "compare": "compare",
    "Comparison": "compare", "Calibration": "relevance",
    "EngineError": "errors", "QueryError": "errors", "NotFoundError": "errors", "IndexFormatError": "errors",
    "ModelLoadError": "errors", "ModelMismatchError": "errors", "DatasetError": "errors",
    "ImageReadError": "errors", "NoCaptionsError": "errors", "WriterBusyError": "errors",
}
__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
    from .compare import Comparison, compare
    from .encoders import Encoder, EncoderSpec, create_encoder
    from .errors import (DatasetError, EngineError, ImageReadError, IndexFormatError, ModelLoadError,
                         ModelMismatchError, NoCaptionsError, NotFoundError, QueryError, WriterBusyError)
    from .evaluation import evaluate
    from .per_query import PerQuery, per_query
    from .query import Filters, Query, Term
    from .relevance import Calibration
    from .searcher import Hit, IndexedImage, Results, SearchConfig, Searcher
    from .store import StoredIndex, open_index


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
