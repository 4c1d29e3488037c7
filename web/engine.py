"""The state the blueprints share (in the manner of flaskr's db.py): `init_app` opens the searcher and the thumbnail
cache once per app and follows index updates; views reach them through `engine()` and `image_or_404`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app
from werkzeug.exceptions import NotFound

from search.errors import EngineError, IndexFormatError, NotFoundError
from search.searcher import IndexedImage, ModelRunner, Searcher, run_inline

from .config import WebConfig
from .thumbnails import ThumbnailCache, default_thumbnail_dir

EXTENSION_KEY = "image_search"
RELOAD_CHECK_SECONDS = 1.0


@dataclass
class Engine:
    """The searcher (model + index, read-only; it owns the switch to new index versions), the settings and the
    thumbnail cache."""

    config: WebConfig
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
            logging.getLogger(__name__).warning("keeping the current index: %s", exc)
            return False

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
    """Open the index and its model for `app` and check for new index versions before each request. `config` must
    be resolved (absolute paths); `run_model` makes the model calls (see Searcher)."""
    if config.index is None:
        raise IndexFormatError("no index given (WebConfig.index)")
    searcher = Searcher.open(config.index, config.model, config.pretrained, config.device, config.search,
                             config.precision, run_model, config.runtime)
    # a server: between model calls its cores search, read SQLite and answer other requests (benchmarks.web_load: p99
    # 16 → 12 ms with one worker, p50 17.6 → 10.2 ms with two, ONNX Runtime, 2 cores)
    searcher.encoder.spin = False
    thumbnails = ThumbnailCache(config.thumbnail_dir or default_thumbnail_dir(config.index), config.thumbnail_size,
                                config.search.max_megapixels)
    app.extensions[EXTENSION_KEY] = state = Engine(config, searcher, thumbnails)

    @app.before_request
    def follow_updates() -> None:  # must return None: anything else would become the response
        state.reload_if_changed()

    return state


def engine() -> Engine:
    return current_app.extensions[EXTENSION_KEY]


def image_or_404(image_id: int) -> IndexedImage:
    """The catalog image `image_id` of the index version serving now; 404 (JSON under /api/) when there is none."""
    try:
        return engine().searcher.image(image_id)
    except NotFoundError as exc:
        raise NotFound(str(exc)) from None
