"""Flask web UI and JSON API over one index or several: `create_app(config)` loads the indexes and each distinct
model once."""
from __future__ import annotations

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from search.errors import EngineError, ImageReadError, NoCaptionsError, NotFoundError, QueryError
from search.searcher import ModelRunner, run_inline

from .config import WebConfig
from .engine import EXTENSION_KEY, init_app

__all__ = ["EXTENSION_KEY", "WebConfig", "create_app"]


def create_app(config: WebConfig | dict | None = None, run_model: ModelRunner = run_inline, **settings) -> Flask:
    """App factory. `config` is a WebConfig or a dict of its fields; keyword settings work too, so a WSGI server can
    call `web:create_app(index="indexes/photos")` or `web:create_app(indexes={"a": "idx/a", "b": "idx/b"})` (the first
    the default). `run_model` makes the model calls (see Searcher)."""
    if not isinstance(config, WebConfig):
        config = WebConfig.from_mapping({**(config or {}), **settings})
    config = config.resolved()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_upload_mb * 1024 * 1024)
    app.json.ensure_ascii = False
    init_app(app, config, run_model)
    app.after_request(_security_headers)

    from .api import api
    from .clip_retrieval_api import clip_retrieval_api
    from .eval_pages import eval_pages
    from .pages import pages
    from .plot_pages import plot_pages

    app.register_blueprint(api)
    app.register_blueprint(pages)
    app.register_blueprint(eval_pages)
    app.register_blueprint(plot_pages)
    app.register_blueprint(clip_retrieval_api)  # /knn-service, /metadata, /indices-list as clip-retrieval's
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
    # an index without captions is no bad query, but the request asked for what the index cannot give
    if isinstance(error, (QueryError, ImageReadError, NoCaptionsError)):
        return 400
    if isinstance(error, NotFoundError):  # no such id; any other missing thing is the server's problem
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
        else:
            message = "internal error"
        return jsonify(error=message), status
