"""Searcher: text→image, image→image and image→text over one opened index, with its model loaded once.

Pure core: returns `Hit`s, raises EngineError subclasses, never prints. Safe to share between threads: the FAISS
indexes and vectors are read-only and model calls are serialised by a lock.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .catalog import ImageRecord
from .encoders import Encoder, EncoderSpec, create_encoder
from .errors import NoCaptionsError, NotFoundError, QueryError
from .images import DEFAULT_MAX_MEGAPIXELS, ImageSource, load_image
from .store import StoredIndex, open_index

TARGETS = ("images", "captions")

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

    def to_json(self) -> dict:
        """The stable per-result shape of `search query --json` (the web API adds ids and URLs)."""
        if self.caption is not None:
            return {"rank": self.rank, "score": round(self.score, 6), "caption": self.caption, "image": self.image}
        return {"rank": self.rank, "score": round(self.score, 6), "image": self.image, "captions": list(self.captions)}


@dataclass(frozen=True)
class IndexedImage:
    """One catalog image as one version of the index knows it: its record, its captions and the image folder that
    version recorded at build time (None when it records none)."""

    record: ImageRecord
    captions: tuple[str, ...]
    recorded_root: str | None


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

    @classmethod
    def open(cls, index_dir: Path | str, model: str | None = None, pretrained: str | None = None,
             device: str | None = None, config: SearchConfig = SearchConfig(), precision: str = "fp32",
             run_model: ModelRunner = run_inline, runtime: str = "auto") -> "Searcher":
        """Open an index with the model it was built with, or with `model`/`pretrained` (which must match), on
        `runtime` (search.encoders.RUNTIMES)."""
        index = open_index(index_dir)
        spec = index.manifest.encoder if model is None else EncoderSpec.from_args(model, pretrained)
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
        vector = self.encode_text(text) if text is not None else self.encode_image(image)
        return self.search_vector(vector, target=target, k=k, offset=offset)

    def search_vector(self, vector: np.ndarray, target: str = "images", k: int = 10, offset: int = 0) -> list[Hit]:
        return self._search(self.index, vector, target, k, offset)

    def similar(self, image_id: int, k: int = 10, offset: int = 0) -> list[Hit]:
        """More like indexed image `image_id`: the images nearest to its stored vector (the image itself included;
        no model call). NotFoundError when the index has no such image."""
        index = self.index  # one snapshot: the id and its vector must come from the version that is searched
        if not 0 <= image_id < index.manifest.n_images:
            raise NotFoundError(f"no image with id {image_id}")
        return self._search(index, index.vectors("images")[image_id], "images", k, offset)

    def image(self, image_id: int) -> IndexedImage:
        """Catalog record and captions of one indexed image; NotFoundError when the index has no such image."""
        index = self.index  # one snapshot: record, captions and image folder of the same version
        record = index.catalog.images([image_id]).get(image_id)
        if record is None:
            raise NotFoundError(f"no image with id {image_id}")
        captions = index.catalog.captions_of([image_id])[image_id]
        return IndexedImage(record, tuple(captions), index.manifest.source.get("images"))

    def _search(self, index: StoredIndex, vector: np.ndarray, target: str, k: int, offset: int) -> list[Hit]:
        """Results offset+1 .. offset+k of `vector` against `target`, all read from the one version `index`: `reopen`
        may swap in a new version meanwhile."""
        if target not in TARGETS:
            raise QueryError(f"unknown target '{target}' (choose images or captions)")
        check_paging(k, offset, self.config)
        if target == "captions" and index.manifest.n_captions == 0:
            raise NoCaptionsError("this index has no captions (it was built from images alone); search images instead")
        vector_index = index.images if target == "images" else index.captions
        scores, ids = vector_index.search(vector[None], offset + k)
        scores, ids = scores[0, offset:], ids[0, offset:]
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        if target == "images":
            return self._image_hits(index, scores, ids, offset)
        return self._caption_hits(index, scores, ids, offset)

    def reopen(self) -> bool:
        """Switch to the index now on disk at the same path (after an update); False when it is the same version.
        Raises like `open_index`/`check_encoder` and then keeps serving the version it had."""
        fresh = open_index(self.index.path)
        if fresh.version == self.index.version:
            return False
        fresh.check_encoder(self.encoder)
        self.index = fresh  # one reference assignment: readers see the old or the new version, never a mix
        return True

    def _image_hits(self, index: StoredIndex, scores: np.ndarray, ids: np.ndarray, offset: int) -> list[Hit]:
        records = index.catalog.images(ids)
        captions = index.catalog.captions_of(ids)
        return [Hit(rank=offset + i + 1, score=float(s), image_id=int(j), image=records[int(j)].path,
                    captions=tuple(captions[int(j)])) for i, (s, j) in enumerate(zip(scores, ids))]

    def _caption_hits(self, index: StoredIndex, scores: np.ndarray, ids: np.ndarray, offset: int) -> list[Hit]:
        captions = index.catalog.captions(ids)
        images = index.catalog.images({c.image_id for c in captions.values()})
        hits = []
        for i, (s, j) in enumerate(zip(scores, ids)):
            caption = captions[int(j)]
            hits.append(Hit(rank=offset + i + 1, score=float(s), image_id=caption.image_id,
                            image=images[caption.image_id].path, caption_id=caption.id, caption=caption.text))
        return hits
