"""The state the blueprints share (in the manner of flaskr's db.py): `init_app` opens every served index with its
searcher and thumbnail cache once per app, loading each distinct model once, and follows each index's updates; views
reach the index of their request through `engine()` and `image_or_404`.

A request names its index with `index=` (query string, JSON body or form field; clip-retrieval's routes with
`indice_name`, see `Engine.select`); without one it gets the default (the first). On a server with several indexes
every URL the app builds for a page, an image or a thumbnail carries `index=NAME` (`url_defaults`)."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, has_request_context, request
from werkzeug.exceptions import BadRequest, NotFound

from search.encoders import Encoder, create_encoder
from search.errors import EngineError, IndexFormatError, NotFoundError
from search.searcher import IndexedImage, ModelRunner, Searcher, model_spec, run_inline
from search.store import open_index

from .config import WebConfig
from .thumbnails import ThumbnailCache, default_thumbnail_dir

EXTENSION_KEY = "image_search"
RELOAD_CHECK_SECONDS = 1.0
INDEX_ARG = "index"  # how a request names its index: ?index=NAME, {"index": NAME}, or a form field
SELECTED_KEY = "image_search.index"  # in the request's WSGI environ: its ServedIndex (per request, unlike g)


@dataclass
class ServedIndex:
    """One served index: its name, its searcher (model + index, read-only; it owns the switch to new index versions)
    and its thumbnail cache."""

    name: str
    searcher: Searcher
    thumbnails: ThumbnailCache
    last_check: float = 0.0

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
            logging.getLogger(__name__).warning("keeping the current version of index %s: %s", self.name, exc)
            return False


@dataclass
class Engine:
    """The settings and the served indexes by name, in order (the first is the default). `searcher`, `thumbnails`
    and `reload_if_changed` are those of the request's index (the default outside a request)."""

    config: WebConfig
    indexes: dict[str, ServedIndex]

    @property
    def default(self) -> ServedIndex:
        return next(iter(self.indexes.values()))

    def current(self) -> ServedIndex:
        """The request's index: the one `select` chose, else the one its `index` argument names (404 for an unknown
        name), else the default."""
        if not has_request_context():
            return self.default
        served = request.environ.get(SELECTED_KEY)
        return served if served is not None else self.select(_requested_name())

    def select(self, name: str | None) -> ServedIndex:
        """Make index `name` (None: the default) the request's, following its updates; NotFound (404) naming the
        indexes there are when none has that name."""
        served = self.default if name is None else self.indexes.get(name)
        if served is None:
            raise NotFound(f"no index named {name} (have: {', '.join(self.indexes)})")
        served.reload_if_changed()
        request.environ[SELECTED_KEY] = served
        return served

    @property
    def searcher(self) -> Searcher:
        return self.current().searcher

    @property
    def thumbnails(self) -> ThumbnailCache:
        return self.current().thumbnails

    def reload_if_changed(self, force: bool = False) -> bool:
        return self.current().reload_if_changed(force)

    def image_file(self, image: IndexedImage) -> Path:
        """The file of a catalog image under the configured image root, or else the one its index version recorded;
        never a path from the request, never outside the root. FileNotFoundError, saying why, when it is not there."""
        root = self.config.images or image.recorded_root
        if root is None:
            raise FileNotFoundError(f"{image.record.path}: the index records no image folder; start the server with "
                                    "--images DIR")
        root = Path(root).resolve()
        path = (root / image.record.path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise FileNotFoundError(f"{image.record.path} not found under {root}")
        return path


def init_app(app: Flask, config: WebConfig, run_model: ModelRunner = run_inline) -> Engine:
    """Open the indexes and their models for `app` (each distinct model once, shared by the indexes built with it)
    and carry the request's index in the URLs the app builds. `config` must be resolved (absolute paths);
    `run_model` makes the model calls (see Searcher)."""
    if not config.indexes:
        raise IndexFormatError("no index given (WebConfig.index or WebConfig.indexes)")
    opened = [(name, open_index(path)) for name, path in config.indexes]  # every path checked before any model load
    encoders: dict[tuple, tuple[Encoder, ModelRunner]] = {}
    indexes = {}
    for name, index in opened:
        spec = model_spec(index, config.model, config.pretrained)
        key = (spec, config.precision, config.runtime, config.device)
        if key not in encoders:
            encoder = create_encoder(spec, config.runtime, device=config.device, precision=config.precision)
            # a server: between model calls its cores search, read SQLite and answer other requests (benchmarks.
            # web_load: p99 16 → 12 ms with one worker, p50 17.6 → 10.2 ms with two, ONNX Runtime, 2 cores)
            encoder.spin = False
            encoders[key] = encoder, _one_call_at_a_time(run_model)
        encoder, runner = encoders[key]
        searcher = Searcher(index, encoder, config.search, runner)  # checks the index was built with this model
        indexes[name] = ServedIndex(name, searcher, ThumbnailCache(_thumbnail_dir(config, name, index.path),
                                                                   config.thumbnail_size, config.search.max_megapixels))
    app.extensions[EXTENSION_KEY] = state = Engine(config, indexes)

    @app.url_defaults
    def carry_index(endpoint: str, values: dict) -> None:
        """With several indexes, pages, images and thumbnails are asked for with the index they belong to."""
        if len(state.indexes) > 1 and INDEX_ARG not in values and has_request_context() \
                and not endpoint.endswith("static"):
            values[INDEX_ARG] = state.current().name

    return state


def _one_call_at_a_time(run_model: ModelRunner) -> ModelRunner:
    """`run_model` under a lock of its own: the searchers sharing one encoder each serialise their model calls, and
    the encoder must see one call at a time across them too."""
    lock = threading.Lock()

    def run(fn):
        with lock:
            return run_model(fn)

    return run


def _thumbnail_dir(config: WebConfig, name: str, index: Path) -> Path:
    """The configured folder (a subfolder per index when there are several: thumbnails without a content hash are
    keyed by image id), else `.NAME.thumbnails` beside the index."""
    if config.thumbnail_dir is None:
        return default_thumbnail_dir(index)
    return config.thumbnail_dir / name if len(config.indexes) > 1 else config.thumbnail_dir


def _requested_name() -> str | None:
    """The `index` a request names: in its query string, its JSON body or its form; None when it names none."""
    name = request.args.get(INDEX_ARG)
    if name is None and request.is_json:
        body = request.get_json(silent=True)
        name = body.get(INDEX_ARG) if isinstance(body, dict) else None
    elif name is None and request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        name = request.form.get(INDEX_ARG)
    if name is not None and not isinstance(name, str):
        raise BadRequest("index must be the name of an index (a string)")
    return name


def engine() -> Engine:
    return current_app.extensions[EXTENSION_KEY]


def image_or_404(image_id: int) -> IndexedImage:
    """The catalog image `image_id` of the index version serving now; 404 (JSON under /api/) when there is none."""
    try:
        return engine().searcher.image(image_id)
    except NotFoundError as exc:
        raise NotFound(str(exc)) from None
