"""Flask web UI and JSON API over one index: `create_app(config)` loads the index and model once."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from search.catalog import ImageRecord
from search.errors import EngineError, ImageReadError, IndexFormatError, QueryError
from search.searcher import SearchConfig, Searcher

from .config import WebConfig
from .thumbnails import ThumbnailCache, default_thumbnail_dir

EXTENSION_KEY = "image_search"


RELOAD_CHECK_SECONDS = 1.0


@dataclass
class Engine:
    """What the blueprints share: the searcher (model + index, read-only), the image root and the thumbnail cache."""

    config: WebConfig
    searcher: Searcher
    thumbnails: ThumbnailCache
    last_check: float = 0.0

    @property
    def images_root(self) -> Path:
        """Absolute: the configured root (resolved at start-up) or the one the manifest records (stored absolute)."""
        root = self.config.images or self.searcher.index.manifest.source.get("images")
        if root is None:
            raise FileNotFoundError("the index records no image folder; start the server with --images DIR")
        return Path(root).resolve()

    def reload_if_changed(self, force: bool = False) -> bool:
        """Switch to a new version of the index on disk (after `indexer update` or a rebuild). Checked at most once a
        second; while a swap is half done, or if the new version cannot be used, the current one keeps serving."""
        now = time.monotonic()
        if not force and now - self.last_check < RELOAD_CHECK_SECONDS:
            return False
        self.last_check = now
        try:
            return self.searcher.reopen()
        except (EngineError, OSError) as exc:
            if force:
                raise
            logging.getLogger(__name__).warning("keeping the current index: %s", exc)
            return False

    def image_file(self, record: ImageRecord) -> Path:
        """The file of a catalog image; never a path from the request, and never outside the image root."""
        path = (self.images_root / record.path).resolve()
        if not path.is_relative_to(self.images_root.resolve()) or not path.is_file():
            raise FileNotFoundError(record.path)
        return path


def engine() -> Engine:
    return current_app.extensions[EXTENSION_KEY]


def create_app(config: WebConfig | dict | None = None, **settings) -> Flask:
    """App factory. `config` is a WebConfig or a dict of its fields; keyword settings work too, so a WSGI server can
    call `web:create_app(index="indexes/photos")`."""
    if not isinstance(config, WebConfig):
        config = WebConfig.from_mapping({**(config or {}), **settings})
    if config.index is None:
        raise IndexFormatError("no index given (WebConfig.index)")
    config = config.resolved()
    search_config = SearchConfig(max_query_chars=config.max_query_chars, max_k=config.max_k,
                                 max_megapixels=config.max_megapixels, text_cache_size=config.text_cache_size)
    searcher = Searcher.open(config.index, config.model, config.pretrained, config.device, search_config,
                             config.precision)
    thumbnails = ThumbnailCache(config.thumbnail_dir or default_thumbnail_dir(config.index), config.thumbnail_size,
                                config.max_megapixels)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_upload_mb * 1024 * 1024)
    app.json.ensure_ascii = False
    app.extensions[EXTENSION_KEY] = Engine(config, searcher, thumbnails)

    @app.before_request
    def follow_updates() -> None:  # must return None: anything else would become the response
        engine().reload_if_changed()

    app.after_request(_security_headers)

    from .api import api
    from .pages import pages

    app.register_blueprint(api)
    app.register_blueprint(pages)
    _register_error_handlers(app)
    return app


# No inline script or style anywhere: the page loads app.js and style.css; query previews are blob: URLs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _security_headers(response):
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")  # frame-ancestors for browsers without CSP 2
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def _status_of(error: Exception) -> int:
    if isinstance(error, HTTPException):
        return error.code or 500
    if isinstance(error, (QueryError, ImageReadError)):
        return 400
    if isinstance(error, (FileNotFoundError, LookupError)):
        return 404
    return 500


def _register_error_handlers(app: Flask) -> None:
    """Errors under /api/ are JSON {"error": ...} with the right status, whatever raised them (413 from the upload
    limit fires before any view runs); HTML pages keep Flask's plain error pages."""

    @app.errorhandler(Exception)
    def handle(error: Exception):
        status = _status_of(error)
        if status >= 500:
            app.logger.exception("request failed: %s %s", request.method, request.path)
        if not request.path.startswith("/api/"):
            return error if isinstance(error, HTTPException) else ("internal error", 500)
        if isinstance(error, HTTPException):
            message = error.description or error.name
        elif isinstance(error, EngineError):
            message = str(error)
        elif status == 404:
            message = "not found"
        else:
            message = "internal error"
        return jsonify(error=message), status
