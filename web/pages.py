"""HTML pages and image files: `/`, `/duplicates?tier=near`, `/thumb/ID` (cached JPEG) and `/image/ID` (the
original), served by catalog id; each takes `?index=NAME` on a server with several indexes (engine.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, abort, render_template, request, send_file

from search.dedupe import TIERS, DuplicateReport, duplicate_report
from search.errors import DatasetError, ImageReadError
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
    """The search page; "only relevant" starts on when the index has a text→image calibration (search/relevance.py),
    since without one the cutoff is only a per-query score-gap guess."""
    manifest = engine().searcher.index.manifest
    calibrated = "text_image" in (manifest.relevance or {}).get("maps", {})
    return render_template("index.html", n_images=manifest.n_images, n_captions=manifest.n_captions,
                           model=str(manifest.encoder), max_upload_mb=engine().config.max_upload_mb,
                           calibrated=calibrated, indexes=list(engine().indexes), index_name=engine().current().name)


MAX_GROUPS_SHOWN = 200  # a page of thumbnails, not the whole listing (the CLI's --json has every group)
_reports: dict[tuple, DuplicateReport] = {}  # (index path, version, tier): a listing compares every pair of images


@pages.get("/duplicates")
def duplicates():
    tier = request.args.get("tier", "near")
    if tier not in TIERS:
        abort(400, f"unknown tier '{tier}' (available: {', '.join(TIERS)})")
    index = engine().searcher.index
    key = (str(index.path), index.version, tier)
    report, problem = _reports.get(key), None
    if report is None:
        try:
            report = duplicate_report(index, tier)
        except DatasetError as exc:  # the exact tier of an index without file hashes: say why on the page
            problem = str(exc)
        else:
            if len(_reports) >= 8:
                _reports.clear()
            _reports[key] = report
    return render_template("duplicates.html", tier=tier, tiers=TIERS, report=report, problem=problem,
                           groups=report.groups[:MAX_GROUPS_SHOWN] if report else (), n_images=index.manifest.n_images)


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
