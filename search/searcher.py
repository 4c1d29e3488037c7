"""Searcher: text→image, image→image and image→text over one opened index, with its model loaded once.

Pure core: returns `Hit`s, raises EngineError subclasses, never prints. Safe to share between threads: the FAISS
indexes and vectors are read-only and model calls are serialised by a lock.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .catalog import ImageRecord
from .encoders import Encoder, EncoderSpec, create_encoder
from .errors import NotFoundError, QueryError
from .images import DEFAULT_MAX_MEGAPIXELS, ImageSource, load_image
from .query import Query, Term
from .retrieval import Candidate, QueryVectors, calibration_kind, query_vectors, rank
from .store import StoredIndex, open_index

TARGETS = ("images", "captions")
FILTER_CACHE_SIZE = 64  # filters → allowed ids, per index version: repeated filtered queries skip the SQL

# how model calls are made: `run_model(fn)` calls fn() and returns its vectors; a server may route them to one thread
ModelRunner = Callable[[Callable[[], np.ndarray]], np.ndarray]


def run_inline(fn: Callable[[], np.ndarray]) -> np.ndarray:
    return fn()


@dataclass(frozen=True)
class SearchConfig:
    max_query_chars: int = 1000
    max_k: int = 1000
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    text_cache_size: int = 256


def checked_text(text: str | None, config: SearchConfig) -> str:
    """The query text stripped; QueryError when empty or over the limit. Callers may check before loading a model."""
    text = (text or "").strip()
    if not text:
        raise QueryError("empty text query")
    if len(text) > config.max_query_chars:
        raise QueryError(f"text query is {len(text)} characters; the limit is {config.max_query_chars}")
    return text


def check_paging(k: int, offset: int, config: SearchConfig) -> None:
    """QueryError unless 1 <= k <= max_k and the page lies within the first 10 * max_k results."""
    if not 1 <= k <= config.max_k:
        raise QueryError(f"k must be between 1 and {config.max_k}")
    if offset < 0 or offset + k > config.max_k * 10:
        raise QueryError(f"offset must be between 0 and {config.max_k * 10 - k}")


@dataclass(frozen=True)
class Hit:
    """One result. For image targets `captions` lists the image's captions; for caption targets `caption` is the
    matched caption and `image` the image it describes."""

    rank: int
    score: float
    image_id: int
    image: str
    captions: tuple[str, ...] = ()
    caption_id: int | None = None
    caption: str | None = None
    relevance: float | None = None  # calibrated probability that the hit is relevant (None: not calibrated)
    matched: tuple[str, ...] = ()  # which rankings found it: "vector", "caption", "file name"
    taken: int | None = None  # when the photo was taken (POSIX seconds), when known

    def to_json(self) -> dict:
        """The stable per-result shape of `search query --json` (the web API adds ids and URLs). `score` is None in
        keyword mode (no vector score)."""
        score = None if self.score != self.score else round(self.score, 6)
        extra = {} if self.relevance is None else {"relevance": round(self.relevance, 4)}
        if self.matched:
            extra["matched"] = list(self.matched)
        if self.taken is not None:
            extra["taken"] = self.taken
        if self.caption is not None:
            return {"rank": self.rank, "score": score, "caption": self.caption, "image": self.image, **extra}
        return {"rank": self.rank, "score": score, "image": self.image, "captions": list(self.captions), **extra}


@dataclass(frozen=True)
class Results:
    """A page of hits and how it was cut. `closest` holds the best few hits when the cutoff left nothing, so an
    empty answer can say "nothing relevant; the closest were …"."""

    hits: list[Hit]
    cutoff: float | None = None
    cutoff_rule: str | None = None
    closest: list[Hit] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str | None:
        """What to tell a user about an empty answer."""
        if self.hits or not self.closest:
            return None
        closest = ", ".join(f"{h.image} ({_relevance_text(h)})" for h in self.closest)
        return f"nothing relevant; the closest were {closest}"

    def to_json(self) -> dict:
        data: dict = {"results": [h.to_json() for h in self.hits]}
        if self.cutoff_rule is not None:
            data["cutoff"] = {"rule": self.cutoff_rule, "level": self.cutoff}
        if self.message:
            data["message"] = self.message
            data["closest"] = [h.to_json() for h in self.closest]
        if self.notes:
            data["notes"] = list(self.notes)
        return data


def _relevance_text(hit: Hit) -> str:
    return f"relevance {hit.relevance:.2f}" if hit.relevance is not None else f"score {hit.score:.3f}"


@dataclass(frozen=True)
class IndexedImage:
    """One catalog image as one version of the index knows it: its record, its captions and the image folder that
    version recorded at build time (None when it records none)."""

    record: ImageRecord
    captions: tuple[str, ...]
    recorded_root: str | None


def model_spec(index: StoredIndex, model: str | None = None, pretrained: str | None = None) -> EncoderSpec:
    """The model to open `index` with: the one it was built with, or `model`/`pretrained` (which must match it)."""
    return index.manifest.encoder if model is None else EncoderSpec.from_args(model, pretrained)


class Searcher:
    def __init__(self, index: StoredIndex, encoder: Encoder, config: SearchConfig = SearchConfig(),
                 run_model: ModelRunner = run_inline):
        """`run_model` makes every model call (always under the searcher's lock): inline by default."""
        index.check_encoder(encoder)
        self.index = index  # the version serving now; each query reads it once (see `reopen`)
        self.encoder = encoder
        self.config = config
        self._lock = threading.Lock()
        self._run_model = run_model
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._filter_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, index_dir: Path | str, model: str | None = None, pretrained: str | None = None,
             device: str | None = None, config: SearchConfig = SearchConfig(), precision: str = "fp32",
             run_model: ModelRunner = run_inline, runtime: str = "auto") -> "Searcher":
        """Open an index with the model it was built with, or with `model`/`pretrained` (which must match), on
        `runtime` (search.encoders.RUNTIMES)."""
        index = open_index(index_dir)
        spec = model_spec(index, model, pretrained)
        return cls(index, create_encoder(spec, runtime, device=device, precision=precision), config, run_model)

    # -- query encoding ---------------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> np.ndarray:
        text = checked_text(text, self.config)
        with self._lock:
            cached = self._text_cache.get(text)
            if cached is not None:
                self._text_cache.move_to_end(text)
                return cached
            vector = self._run_model(lambda: self.encoder.encode_texts([text])[0])
            self._text_cache[text] = vector
            if len(self._text_cache) > self.config.text_cache_size:
                self._text_cache.popitem(last=False)
            return vector

    def encode_image(self, image: ImageSource) -> np.ndarray:
        decoded = load_image(image, self.config.max_megapixels)
        pixels = self.encoder.preprocess_image(decoded)[None]
        with self._lock:
            return self._run_model(lambda: self.encoder.encode_pixels(pixels)[0])

    # -- search -----------------------------------------------------------------------------------------------------

    def search(self, *, text: str | None = None, image: ImageSource | None = None, target: str = "images",
               k: int = 10, offset: int = 0) -> list[Hit]:
        """Exactly one of `text` or `image`; results ranked offset+1 .. offset+k against `target`."""
        if (text is None) == (image is None):
            raise QueryError("give exactly one of a text or an image query")
        return self.run(Query((Term(text=text, image=image),), target=target, k=k, offset=offset)).hits

    def similar(self, image_id: int, k: int = 10, offset: int = 0) -> list[Hit]:
        """More like indexed image `image_id`: the images nearest to its stored vector (the image itself included;
        no model call). NotFoundError when the index has no such image."""
        return self.run(Query((Term(image_id=image_id),), k=k, offset=offset)).hits

    def image(self, image_id: int) -> IndexedImage:
        """Catalog record and captions of one indexed image; NotFoundError when the index has no such image."""
        index = self.index  # one snapshot: record, captions and image folder of the same version
        record = index.catalog.images([image_id]).get(image_id)
        if record is None:
            raise NotFoundError(f"no image with id {image_id}")
        captions = index.catalog.captions_of([image_id])[image_id]
        return IndexedImage(record, tuple(captions), index.manifest.source.get("images"))

    def run(self, query: Query) -> Results:
        """A compound, filtered, cut, deduplicated search (search/query.py, search/retrieval.py), all read from one
        version of the index: `reopen` may swap in a new version meanwhile."""
        index = self.index
        self._check(query, query.texts)
        vectors = self.query_vectors(index, query) if query.mode != "keyword" else None
        return self._results(index, query, vectors)

    def run_vector(self, vector: np.ndarray, query: Query, kind: str = "image") -> Results:
        """`run` with a ready query vector (say, an embedding a client computed) in place of the query's terms, which
        are then ignored: its target, page, filters, cutoff and dedupe apply. `kind` ("text" or "image") names the
        calibration that judges the hits. QueryError for a vector of the wrong length or of length zero."""
        index = self.index
        vector = np.asarray(vector, np.float32).reshape(-1)
        if vector.shape[0] != index.manifest.dim or not np.all(np.isfinite(vector)):
            raise QueryError(f"the query vector must hold {index.manifest.dim} finite numbers (this index's model)")
        if (norm := float(np.linalg.norm(vector))) < 1e-12:
            raise QueryError("the query vector has length zero")
        self._check(query)
        vector = vector / norm
        return self._results(index, query,
                             QueryVectors(vector, ((vector, calibration_kind(kind, query.target)),), True))

    def _check(self, query: Query, texts: list[Term] = ()) -> None:
        """QueryError for an unknown target, a text term over the limits or a page outside them, in that order
        (before any model call)."""
        if query.target not in TARGETS:
            raise QueryError(f"unknown target '{query.target}' (choose images or captions)")
        for term in texts:
            checked_text(term.text, self.config)
        check_paging(query.k, query.offset, self.config)

    def query_vectors(self, index: StoredIndex, query: Query) -> QueryVectors:
        """The terms' vectors, combined (search/retrieval.py); image_id terms take the stored vector (no model)."""
        vectors = []
        for term in query.terms:
            if term.text is not None:
                vectors.append(self.encode_text(term.text))
            elif term.image is not None:
                vectors.append(self.encode_image(term.image))
            else:
                if not 0 <= term.image_id < index.manifest.n_images:
                    raise NotFoundError(f"no image with id {term.image_id}")
                vectors.append(np.asarray(index.vectors("images")[term.image_id], np.float32))
        return query_vectors(vectors, query)

    def _results(self, index: StoredIndex, query: Query, vectors: QueryVectors | None) -> Results:
        allowed = self._allowed(index, query)
        ranking = rank(index, query, vectors, allowed)
        to_hits = self._image_hits if query.target == "images" else self._caption_hits
        return Results(to_hits(index, ranking.page, query.offset), ranking.cutoff, ranking.cutoff_rule,
                       to_hits(index, ranking.closest, 0), ranking.notes)

    def _allowed(self, index: StoredIndex, query: Query) -> np.ndarray | None:
        """Ids of the target the filters admit (None: no filters), cached per index version and filter."""
        if query.filters.is_empty():
            return None
        key = (index.version, query.target, query.filters)
        with self._lock:
            cached = self._filter_cache.get(key)
        if cached is None:
            cached = index.catalog.filter_ids(query.filters)
            if query.target == "captions":
                links = index.catalog.caption_links()
                caption_ids = np.array([c for c, _ in links], np.int64)
                image_ids = np.array([i for _, i in links], np.int64)
                cached = caption_ids[np.isin(image_ids, cached)]
            with self._lock:
                self._filter_cache[key] = cached
                if len(self._filter_cache) > FILTER_CACHE_SIZE:
                    self._filter_cache.popitem(last=False)
        return cached

    def reopen(self) -> bool:
        """Switch to the index now on disk at the same path (after an update); False when it is the same version.
        Raises like `open_index`/`check_encoder` and then keeps serving the version it had."""
        fresh = open_index(self.index.path)
        if fresh.version == self.index.version:
            return False
        fresh.check_encoder(self.encoder)
        self.index = fresh  # one reference assignment: readers see the old or the new version, never a mix
        return True

    def _image_hits(self, index: StoredIndex, found: list[Candidate], offset: int) -> list[Hit]:
        ids = [c.id for c in found]
        records = index.catalog.images(ids)
        captions = index.catalog.captions_of(ids)
        return [Hit(rank=offset + i + 1, score=_score(c), image_id=c.id, image=records[c.id].path,
                    captions=tuple(captions[c.id]), relevance=c.relevance, matched=c.matched,
                    taken=getattr(records[c.id], "taken", None)) for i, c in enumerate(found)]

    def _caption_hits(self, index: StoredIndex, found: list[Candidate], offset: int) -> list[Hit]:
        captions = index.catalog.captions([c.id for c in found])
        images = index.catalog.images({c.image_id for c in captions.values()})
        hits = []
        for i, c in enumerate(found):
            caption = captions[c.id]
            hits.append(Hit(rank=offset + i + 1, score=_score(c), image_id=caption.image_id,
                            image=images[caption.image_id].path, caption_id=caption.id, caption=caption.text,
                            relevance=c.relevance, matched=c.matched))
        return hits


def _score(candidate: Candidate) -> float:
    return float("nan") if candidate.score is None else candidate.score
