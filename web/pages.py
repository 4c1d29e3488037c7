"""HTML page and image files: `/`, `/thumb/ID` (cached JPEG) and `/image/ID` (the original), served by catalog id."""
from __future__ import annotations

from flask import Blueprint, abort, render_template, send_file

from search.errors import ImageReadError

from . import engine

pages = Blueprint("pages", __name__, template_folder="templates", static_folder="static",
                  static_url_path="/static")

CACHE_SECONDS = 24 * 3600


def _record(image_id: int):
    record = engine().searcher.index.catalog.images([image_id]).get(image_id)
    if record is None:
        abort(404)
    try:
        return record, engine().image_file(record)
    except FileNotFoundError:
        abort(404)


@pages.get("/")
def home():
    manifest = engine().searcher.index.manifest
    return render_template("index.html", n_images=manifest.n_images, n_captions=manifest.n_captions,
                           model=str(manifest.encoder), max_upload_mb=engine().config.max_upload_mb)


@pages.get("/thumb/<int:image_id>")
def thumbnail(image_id: int):
    record, path = _record(image_id)
    try:
        thumb = engine().thumbnails.get(record.sha1 or f"id{image_id}", path)
    except ImageReadError:
        abort(404)
    return send_file(thumb, mimetype="image/jpeg", conditional=True, etag=True, max_age=CACHE_SECONDS)


@pages.get("/image/<int:image_id>")
def original(image_id: int):
    _, path = _record(image_id)
    return send_file(path, conditional=True, etag=True, max_age=CACHE_SECONDS)
