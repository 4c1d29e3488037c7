"""Typed configuration of the web app."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from search.searcher import SearchConfig


PATH_FIELDS = ("index", "images", "thumbnail_dir", "compare_index")
ADMIN_TOKEN_ENV = "IMAGE_SEARCH_ADMIN_TOKEN"
WEB_MAX_K = 100  # results per page a browser or API client may ask for (the CLI allows SearchConfig's default)


@dataclass(frozen=True)
class WebConfig:
    index: Path | None = None  # index directory (required)
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
        token = self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
        return replace(self, admin_token=token, **paths)

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
        return replace(cls(), **{**values, **paths}, search=search)
