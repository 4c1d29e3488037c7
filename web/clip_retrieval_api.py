"""A clip-retrieval compatible API beside ours, so scripts written for a clip-retrieval back end (`ClipClient`,
knn.laion.ai's clients) work against this server unchanged. Shapes follow clip_retrieval/clip_back.py (2.45.0):

POST /knn-service  {"text" | "image" (base64) | "image_url" | "embedding_input", "modality": "image"|"text",
                    "num_images", "num_result_ids", "indice_name", "deduplicate", ...}
                   → [{"id", "similarity", "url", "image_path", "caption", "captions"}, ...]
POST /metadata     {"indice_name", "ids"} → [{"id", "metadata": {"url", "image_path", "caption", ...}}, ...]
GET  /indices-list → ["NAME", ...]   (the served indexes' names, the default first: a one-index server names its
                                     index after its directory)

Differences: "id" is our image id (with modality "text", the image of the matched caption; "caption_id" says which);
"url" is this server's /image/ID; no base64 "image" field (fetch "url"); safety, violence, aesthetic and mclip
options are accepted and ignored; bad input is a 400 {"error": ...} where clip-back would fail with a 500.
"""
from __future__ import annotations

import base64
import binascii
import math

from flask import Blueprint, current_app, jsonify, request, url_for
from werkzeug.exceptions import BadRequest

from search.query import Query, Term
from search.searcher import Hit

from .engine import engine, image_or_404
from .image_urls import fetch_image

__all__ = ["clip_retrieval_api"]

clip_retrieval_api = Blueprint("clip_retrieval_api", __name__)

MODALITY_TARGETS = {"image": "images", "text": "captions"}
DEFAULT_NUM_IMAGES = 40  # ClipClient's default
# sent by clip-retrieval clients, meaningless here (no safety/violence/aesthetic models, one multilingual-free model)
IGNORED_FIELDS = ("use_mclip", "use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight",
                  "use_ensemble")
QUERY_FIELDS = ("text", "image", "image_url", "embedding_input")


@clip_retrieval_api.after_request
def _cors(response):
    """clip-back answers every origin (flask_cors' CORS(app)): browser front ends on other hosts call it."""
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type"
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    return response


@clip_retrieval_api.errorhandler(Exception)
def _error(error: Exception):
    from . import _status_of  # the app's mapping of errors to statuses

    status = _status_of(error)
    if status >= 500:
        current_app.logger.exception("request failed: %s %s", request.method, request.path)
        return jsonify(error="internal error"), status
    message = getattr(error, "description", None) or str(error)
    return jsonify(error=message), status


def _body() -> dict:
    body = request.get_json(force=True, silent=True)  # ClipClient sends JSON without a Content-Type
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    return body


def _check_index(body: dict) -> None:
    """`indice_name` chooses the index (none: the default, as clip-back takes its first); 400 for an unknown one."""
    name = body.get("indice_name")
    names = engine().indexes
    if name is not None and (not isinstance(name, str) or name not in names):
        raise BadRequest(f"unknown indice_name {name!r} (this server has {', '.join(map(repr, names))})")
    engine().select(name)


def _count(body: dict, name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a positive integer")
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def _given(body: dict) -> tuple[str, object]:
    """The one query field given (None and "" count as absent, as ClipClient sends every field)."""
    given = [(name, body[name]) for name in QUERY_FIELDS if body.get(name) not in (None, "", [])]
    if len(given) != 1:
        raise BadRequest("give exactly one of text, image, image_url or embedding_input")
    return given[0]


def _image_bytes(value) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("image must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None


def _vector(value) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              and math.isfinite(x) for x in value):
        raise BadRequest("embedding_input must be a list of numbers")
    return value


def result_json(hit: Hit) -> dict:
    """One clip-back result: its metadata columns (url, image_path, caption) plus id and similarity."""
    caption = hit.caption if hit.caption is not None else (hit.captions[0] if hit.captions else None)
    result = {"id": hit.image_id, "similarity": float(hit.score),
              "url": url_for("pages.original", image_id=hit.image_id, _external=True),
              "image_path": hit.image, "caption": caption}
    if hit.caption_id is not None:
        result["caption_id"] = hit.caption_id
    else:
        result["captions"] = list(hit.captions)
    return result


@clip_retrieval_api.route("/knn-service", methods=["POST"])
def knn_service():
    body = _body()
    _check_index(body)
    modality = body.get("modality", "image")
    if modality not in MODALITY_TARGETS:
        raise BadRequest("modality must be image or text")
    num_images = _count(body, "num_images", DEFAULT_NUM_IMAGES)
    k = min(num_images, _count(body, "num_result_ids", num_images))  # clip-back returns at most num_result_ids
    max_k = engine().config.search.max_k
    if k > max_k:
        raise BadRequest(f"num_images must be at most {max_k} on this server")
    dedupe = _flag(body, "deduplicate", False)  # clip-back's default when the field is missing
    name, value = _given(body)
    searcher = engine().searcher
    if name == "embedding_input":
        query = Query((Term(image_id=0),), target=MODALITY_TARGETS[modality], k=k, dedupe=dedupe)  # term unused
        return jsonify([result_json(h) for h in searcher.run_vector(_vector(value), query).hits])
    if name == "text":
        if not isinstance(value, str):
            raise BadRequest("text must be a string")
        term = Term(text=value)
    elif name == "image":
        term = Term(image=_image_bytes(value))
    else:
        config = engine().config
        if not config.allow_image_urls:
            raise BadRequest("image_url queries are off on this server (start it with --allow-image-urls); "
                             "send the image itself in `image` (base64)")
        if not isinstance(value, str):
            raise BadRequest("image_url must be a string")
        term = Term(image=fetch_image(value, int(config.max_upload_mb * 1024 * 1024)))
    query = Query((term,), target=MODALITY_TARGETS[modality], k=k, dedupe=dedupe)
    return jsonify([result_json(h) for h in searcher.run(query).hits])


@clip_retrieval_api.route("/metadata", methods=["POST"])
def metadata():
    body = _body()
    _check_index(body)
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("ids must be a list of integers")
    if len(ids) > engine().config.search.max_k:
        raise BadRequest(f"at most {engine().config.search.max_k} ids per request")
    answer = []
    for image_id in ids:
        image = image_or_404(image_id)
        captions = list(image.captions)
        answer.append({"id": image_id, "metadata": {
            "url": url_for("pages.original", image_id=image_id, _external=True), "image_path": image.record.path,
            "caption": captions[0] if captions else None, "captions": captions, "width": image.record.width,
            "height": image.record.height}})
    return jsonify(answer)


@clip_retrieval_api.get("/indices-list")
def indices_list():
    return jsonify(list(engine().indexes))

