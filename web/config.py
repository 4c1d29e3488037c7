"""Typed configuration of the web app."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from collections.abc import Iterable, Mapping

from search.errors import IndexFormatError
from search.searcher import SearchConfig


PATH_FIELDS = ("index", "images", "thumbnail_dir", "compare_index")
ADMIN_TOKEN_ENV = "IMAGE_SEARCH_ADMIN_TOKEN"
WEB_MAX_K = 100  # results per page a browser or API client may ask for (the CLI allows SearchConfig's default)


@dataclass(frozen=True)
class WebConfig:
    index: Path | None = None  # index directory: the one-index shorthand of `indexes` (one of the two is required)
    # (name, index directory) of every index served, in order, the first the default; names are what `index=` and
    # clip-retrieval's `indice_name` ask for. A dict {name: path} is accepted too. Default: ((index.name, index),)
    indexes: tuple[tuple[str, Path], ...] = ()
    model: str | None = None  # default: the model the index was built with
    pretrained: str | None = None
    device: str | None = None
    precision: str = "fp32"
    runtime: str = "auto"  # search.encoders.RUNTIMES: onnx keeps torch out of the server process
    images: Path | None = None  # image root; default: the one recorded in the manifest at build time
    max_upload_mb: float = 20.0
    allow_image_urls: bool = False  # POST /knn-service may fetch `image_url` (public addresses only)
    # query limits, decoding limit and text cache; its fields are also accepted flat by `from_mapping`
    search: SearchConfig = SearchConfig(max_k=WEB_MAX_K)
    thumbnail_size: int = 256
    thumbnail_dir: Path | None = None  # default: INDEX/.thumbnails, or a temporary folder if the index is read-only
    # required by POST /api/reload when set; without one, only loopback clients may reload
    admin_token: str | None = None
    # a second index of the same dataset (another model, precision, fine-tune, index type): /eval compares the two
    compare_index: Path | None = None

    def resolved(self) -> "WebConfig":
        """The same settings with every path made absolute against the current directory, once, at start-up: Flask
        resolves relative paths against the package folder, and a server's working directory may change."""
        paths = {name: Path(getattr(self, name)).expanduser().resolve()
                 for name in PATH_FIELDS if getattr(self, name) is not None}
        served = named_indexes(self.indexes, paths.get("index"))
        paths["index"] = served[0][1] if served else None
        token = self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
        return replace(self, admin_token=token, indexes=served, **paths)

    @classmethod
    def from_mapping(cls, values: dict) -> "WebConfig":
        """Build from plain keyword values (e.g. gunicorn's `web:create_app(index="...", max_k=50)`): WebConfig's
        fields and, flat, SearchConfig's (applied over `search` when both are given); unknown keys are errors."""
        search_keys = {f.name for f in fields(SearchConfig)}
        unknown = set(values) - {f.name for f in fields(cls)} - search_keys
        if unknown:
            raise TypeError(f"unknown WebConfig settings: {', '.join(sorted(unknown))}")
        values = dict(values)
        flat = {k: values.pop(k) for k in search_keys & set(values)}
        search = replace(values.pop("search", None) or cls.search, **flat)
        paths = {k: Path(v) for k, v in values.items() if k in PATH_FIELDS and v is not None}
        if values.get("indexes"):  # gunicorn's `web:create_app(indexes={"a": "idx/a", "b": "idx/b"})`
            paths["indexes"] = tuple((name, Path(path)) for name, path in _pairs(values["indexes"]))
        return replace(cls(), **{**values, **paths}, search=search)


def _pairs(indexes: Mapping | Iterable) -> list[tuple]:
    return list(indexes.items() if isinstance(indexes, Mapping) else indexes)


def named_indexes(indexes: Mapping | Iterable, index: Path | None = None) -> tuple[tuple[str, Path], ...]:
    """`indexes` as ((name, absolute path), ...), or ((index.name, index),) when it is empty; `index` given beside
    `indexes` must be their first (the default). IndexFormatError for an empty or repeated name."""
    served = tuple((name, Path(path).expanduser().resolve()) for name, path in _pairs(indexes))
    if not served:
        return () if index is None else ((index.name, index),)
    if index is not None and index != served[0][1]:
        raise IndexFormatError("give `index` (one index) or `indexes` (several, the first the default), not both")
    seen: set[str] = set()
    for name, path in served:
        if not isinstance(name, str) or not name.strip():
            raise IndexFormatError(f"the index {path} needs a name (NAME=PATH)")
        if name in seen:
            raise IndexFormatError(f"two indexes are named {name!r}; give each its own name (--index NAME=PATH)")
        seen.add(name)
    return served


def read_indices_paths(file: Path | str) -> tuple[tuple[str, Path], ...]:
    """The indexes of a clip-retrieval `indices_paths.json`: {"NAME": "PATH", ...} or {"NAME": {"indice_folder":
    "PATH", ...}, ...} (clip-back's other options are ignored), in the file's order. Relative paths are taken from the
    current directory, as clip-back takes them. IndexFormatError when the file is unreadable or shaped otherwise."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{file}: unreadable indices file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or not data:
        raise IndexFormatError(f'{file}: expected a JSON object {{"NAME": "INDEX_PATH", ...}}')
    served = []
    for name, value in data.items():
        path = value.get("indice_folder") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path:
            raise IndexFormatError(f'{file}: index {name!r} must be a path or {{"indice_folder": PATH}}')
        served.append((name, Path(path)))
    return tuple(served)
