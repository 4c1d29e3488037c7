"""The JSON API (stable spellings: scripts rely on them).

GET  /api/search?q=TEXT&k=10&offset=0&cutoff=none text → images
POST /api/search  (JSON: terms, target, k, offset, cutoff, filters, mode, dedupe, sort — search/query.py)
POST /api/search/image  (multipart `image`; target=images|captions, k, offset)
GET  /api/search/similar?id=ID&k=10&offset=0      "more like this": an indexed image → images, without re-encoding
GET  /api/images/ID                               metadata and captions of one image
GET  /api/health
GET  /api/stats                                   the indexes in use: type, size, recall@10 against exact search
GET  /api/indexes                                 the served indexes: name, model, counts, which is the default

Every call takes `index=NAME` (query string; in POST /api/search's JSON body too) to ask a server with several indexes
for one of them (404 for an unknown name); without it, the default (the first) answers.
"""
from __future__ import annotations

import hmac
import ipaddress
import time

from flask import Blueprint, jsonify, request, url_for
from werkzeug.exceptions import BadRequest, Forbidden, Unauthorized

from search.errors import EngineError
from search.index_choice import ann_stats
from search.query import Query, Term
from search.searcher import TARGETS, Hit, Results

from .engine import INDEX_ARG, engine, image_or_404

api = Blueprint("api", __name__, url_prefix="/api")


def _int_arg(source, name: str, default: int) -> int:
    raw = source.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


def _paging(source) -> tuple[int, int]:
    return _int_arg(source, "k", 10), _int_arg(source, "offset", 0)


def hit_json(hit: Hit) -> dict:
    """The CLI's `query --json` result plus what a browser needs: the image id and its thumbnail URL."""
    extra = {"id": hit.image_id, "thumbnail": url_for("pages.thumbnail", image_id=hit.image_id)}
    if hit.caption is not None:
        extra["caption_id"] = hit.caption_id
    return {**hit.to_json(), **extra}


def _respond(query, started: float, hits: list[Hit], **extra):
    return jsonify(query=query, took_ms=round((time.perf_counter() - started) * 1000, 2),
                   results=[hit_json(h) for h in hits], **extra)


def _respond_results(query, started: float, results: Results):
    """`_respond` plus how the page was cut: cutoff, an empty answer's message and closest hits, notes."""
    extra = {key: value for key, value in results.to_json().items() if key not in ("results", "closest")}
    if results.message:
        extra["closest"] = [hit_json(h) for h in results.closest]
    return _respond(query, started, results.hits, **extra)


@api.get("/search")
def search_text():
    started = time.perf_counter()
    text = request.args.get("q", "")
    k, offset = _paging(request.args)
    query = Query((Term(text=text),), k=k, offset=offset, cutoff=request.args.get("cutoff"))  # QueryError → 400
    return _respond_results(text, started, engine().searcher.run(query))


@api.post("/search")
def search_compound():
    """A compound, filtered, cut query as JSON (search.query.Query.from_json spells the fields)."""
    started = time.perf_counter()
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("send a JSON object (Content-Type: application/json)")
    query = Query.from_json({key: value for key, value in body.items() if key != INDEX_ARG}
                            if isinstance(body, dict) else body)  # `index` chose the searcher (engine.py)
    return _respond_results(query.label, started, engine().searcher.run(query))


@api.post("/search/image")
def search_image():
    started = time.perf_counter()
    upload = request.files.get("image")
    if upload is None:
        raise BadRequest("no file in multipart field 'image'")
    target = request.form.get("target", "images")
    if target not in TARGETS:
        raise BadRequest("target must be images or captions")
    k, offset = _paging(request.form)
    hits = engine().searcher.search(image=upload.read(), target=target, k=k, offset=offset)
    return _respond(upload.filename or "upload", started, hits, target=target)


@api.get("/search/similar")
def search_similar():
    started = time.perf_counter()
    image_id = _int_arg(request.args, "id", -1)
    k, offset = _paging(request.args)
    return _respond(image_id, started, engine().searcher.similar(image_id, k=k, offset=offset))


@api.get("/images/<int:image_id>")
def image_info(image_id: int):
    image = image_or_404(image_id)
    record = image.record
    return jsonify(id=record.id, image=record.path, width=record.width, height=record.height,
                   captions=list(image.captions), thumbnail=url_for("pages.thumbnail", image_id=image_id),
                   url=url_for("pages.original", image_id=image_id))


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _require_admin() -> None:
    """With an admin token configured, the request must carry it (`Authorization: Bearer TOKEN`); without one, only
    clients on this machine may call admin endpoints."""
    token = engine().config.admin_token
    if token is None:
        if not _is_loopback(request.remote_addr):
            raise Forbidden("admin endpoints answer only on loopback unless the server has an admin token "
                            "(--admin-token or IMAGE_SEARCH_ADMIN_TOKEN)")
        return
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("missing or wrong admin token (send Authorization: Bearer TOKEN)")


@api.post("/reload")
def reload():
    """Switch to the index version now on disk; 409 with the reason when it cannot be used. Admin only."""
    _require_admin()
    try:
        switched = engine().reload_if_changed(force=True)
    except EngineError as exc:
        return jsonify(error=f"kept the current index: {exc}"), 409
    manifest = engine().searcher.index.manifest
    return jsonify(reloaded=switched, images=manifest.n_images, captions=manifest.n_captions)


@api.get("/health")
def health():
    searcher = engine().searcher
    manifest = searcher.index.manifest
    return jsonify(status="ok", images=manifest.n_images, captions=manifest.n_captions, model=str(manifest.encoder),
                   dim=manifest.dim)


@api.get("/stats")
def stats():
    """Counts, model and, per kind, the index in use with its recall@10 against exact search (see ann_stats)."""
    index = engine().searcher.index  # one snapshot: manifest and files of the same version
    manifest = index.manifest
    return jsonify(images=manifest.n_images, captions=manifest.n_captions, model=str(manifest.encoder),
                   created=manifest.created, indexes=ann_stats(manifest, index.path))


@api.get("/indexes")
def indexes():
    """The served indexes in order (the first is the default, the one a request naming none gets)."""
    state = engine()
    answer = []
    for served in state.indexes.values():
        served.reload_if_changed()
        manifest = served.searcher.index.manifest
        answer.append({"name": served.name, "model": str(manifest.encoder), "images": manifest.n_images,
                       "captions": manifest.n_captions, "default": served is state.default})
    return jsonify(answer)
