"""HTML page and image files: `/`, `/thumb/ID` (cached JPEG) and `/image/ID` (the original), served by catalog id."""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, abort, render_template, send_file

from search.errors import ImageReadError
from search.searcher import IndexedImage

from .engine import engine, image_or_404

pages = Blueprint("pages", __name__, template_folder="templates", static_folder="static",
                  static_url_path="/static")

CACHE_SECONDS = 24 * 3600
log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


def _file_or_404(image_id: int) -> tuple[IndexedImage, Path]:
    image = image_or_404(image_id)
    try:
        return image, engine().image_file(image)
    except FileNotFoundError as exc:
        # a moved image root or a deleted file: say which, or a grid of broken pictures is all anyone sees
        log.warning("image %d: %s", image_id, exc)
        abort(404)


@pages.get("/")
def home():
    manifest = engine().searcher.index.manifest
    return render_template("index.html", n_images=manifest.n_images, n_captions=manifest.n_captions,
                           model=str(manifest.encoder), max_upload_mb=engine().config.max_upload_mb)


@pages.get("/thumb/<int:image_id>")
def thumbnail(image_id: int):
    image, path = _file_or_404(image_id)
    key = image.record.sha1 or f"id{image_id}"
    try:
        thumb = engine().thumbnails.get(key, path)
    except ImageReadError as exc:
        log.warning("thumbnail of image %d: %s", image_id, exc)
        abort(404)
    etag = True if not hasattr(thumb, "read") else key  # bytes in memory: the content hash is the ETag
    return send_file(thumb, mimetype="image/jpeg", conditional=True, etag=etag, max_age=CACHE_SECONDS)


@pages.get("/favicon.ico")
def favicon():
    """Browsers ask for /favicon.ico whatever the page links: answer with the page's icon, not a logged 404."""
    return send_file(STATIC / "favicon.svg", mimetype="image/svg+xml", max_age=CACHE_SECONDS)


@pages.get("/image/<int:image_id>")
def original(image_id: int):
    _, path = _file_or_404(image_id)
    return send_file(path, conditional=True, etag=True, max_age=CACHE_SECONDS)
