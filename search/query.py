"""What a search asks for: weighted terms, filters, a relevance cutoff, a mode, dedupe and sort order.

One `Query` serves the command line (`search query --text A --minus-text B …`), the JSON API (`POST /api/search`)
and library callers. Parsing from JSON lives here too, so the API and scripts agree on spellings. Plain data only:
`search/retrieval.py` runs a query.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from .errors import QueryError
from .images import ImageSource

MODES = ("vector", "keyword", "hybrid")
SORTS = ("relevance", "date")
CUTOFF_AUTO, CUTOFF_NONE = "auto", "none"
MAX_TERMS = 16


@dataclass(frozen=True)
class Term:
    """One part of a compound query: exactly one of a text, an image (bytes or a decoded image) or the id of an
    indexed image, with a weight; a negative weight ("without …") pushes results away from it."""

    text: str | None = None
    image: ImageSource | None = None
    image_id: int | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.text, self.image, self.image_id))
        if given != 1:
            raise QueryError("each query term needs exactly one of text, image or image_id")
        if not math.isfinite(self.weight) or self.weight == 0:
            raise QueryError("a term's weight must be a non-zero number")

    @property
    def label(self) -> str:
        what = f"“{self.text}”" if self.text is not None else (
            f"image {self.image_id}" if self.image_id is not None else "an image")
        return what if self.weight == 1 else f"{self.weight:+g}×{what}"


@dataclass(frozen=True)
class Filters:
    """Which images may be returned; None = no condition. Dates are POSIX seconds (UTC) of when the photo was taken
    (EXIF DateTimeOriginal, else the file's mtime), bounds inclusive."""

    path_prefix: str | None = None  # a folder ("holiday/2024/") or any prefix of the path under the image root
    split: str | None = None
    min_width: int | None = None
    min_height: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    taken_after: float | None = None
    taken_before: float | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in asdict(self).values())

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Filters":
        """From the API's `filters` object: the field names above; dates also as ISO 8601 (`2024-05-01`)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise QueryError("filters must be an object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise QueryError(f"unknown filter {sorted(unknown)[0]!r} (known: {', '.join(cls.__dataclass_fields__)})")
        values = {}
        for name, value in data.items():
            if value is None or value == "":
                continue
            if name in ("path_prefix", "split"):
                if not isinstance(value, str):
                    raise QueryError(f"filter {name} must be a string")
                values[name] = value
            elif name.startswith("taken_"):
                values[name] = parse_date(value, name, end_of_day=name == "taken_before")
            else:
                values[name] = _int(value, name)
        return cls(**values)


def parse_date(value, name: str = "date", end_of_day: bool = False) -> float:
    """POSIX seconds from a number or an ISO 8601 date/time (naive ones are UTC). A bare date means its first
    second, or with `end_of_day` its last (so "before 2024-05-01" includes that day)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            bare_date = len(value.strip()) == 10
            return parsed.timestamp() + (86400 - 1e-3 if end_of_day and bare_date else 0)
    raise QueryError(f"{name} must be a date like 2024-05-01 or 2024-05-01T12:00 (or POSIX seconds)")


def _int(value, name: str) -> int:
    if isinstance(value, bool):
        raise QueryError(f"{name} must be an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise QueryError(f"{name} must be an integer") from None
    if number < 0:
        raise QueryError(f"{name} must not be negative")
    return number


def parse_cutoff(value) -> str | float | None:
    """`auto`, `none`/None, or a relevance level P in [0, 1]."""
    if value is None or value == CUTOFF_NONE or value is False:
        return None
    if value == CUTOFF_AUTO or value is True:
        return CUTOFF_AUTO
    try:
        level = float(value)
    except (TypeError, ValueError):
        raise QueryError("cutoff must be auto, none or a relevance level between 0 and 1") from None
    if not 0 <= level <= 1:
        raise QueryError("cutoff must be auto, none or a relevance level between 0 and 1")
    return level


@dataclass(frozen=True)
class Query:
    """A search. `target` images or captions; results ranked offset+1 .. offset+k. `cutoff` None keeps every hit,
    `auto` those at or above the index's stored precision target, a float P those with relevance ≥ P."""

    terms: tuple[Term, ...]
    target: str = "images"
    k: int = 10
    offset: int = 0
    cutoff: str | float | None = None
    filters: Filters = field(default_factory=Filters)
    mode: str = "vector"
    dedupe: bool = False
    sort: str = "relevance"

    def __post_init__(self) -> None:
        if not self.terms:
            raise QueryError("a query needs at least one term")
        if len(self.terms) > MAX_TERMS:
            raise QueryError(f"a query takes at most {MAX_TERMS} terms")
        if not any(t.weight > 0 for t in self.terms):
            raise QueryError("a query needs at least one term with a positive weight")
        if self.mode not in MODES:
            raise QueryError(f"unknown mode '{self.mode}' (choose {', '.join(MODES)})")
        if self.sort not in SORTS:
            raise QueryError(f"unknown sort '{self.sort}' (choose {', '.join(SORTS)})")
        object.__setattr__(self, "cutoff", parse_cutoff(self.cutoff))

    @property
    def texts(self) -> list[Term]:
        return [t for t in self.terms if t.text is not None]

    @property
    def label(self) -> str:
        return " ".join(t.label for t in self.terms)

    def with_page(self, k: int, offset: int) -> "Query":
        return replace(self, k=k, offset=offset)

    @classmethod
    def from_json(cls, data: Any, max_terms: int = MAX_TERMS) -> "Query":
        """From the body of `POST /api/search`:
        {"terms": [{"text": "a dog", "weight": 1}, {"image_id": 12, "weight": 0.5}, {"image": "<base64>"}],
         "target": "images", "k": 20, "offset": 0, "cutoff": "auto", "filters": {...}, "mode": "vector",
         "dedupe": true, "sort": "relevance"}. QueryError (→ HTTP 400) for anything malformed."""
        import base64
        import binascii

        if not isinstance(data, dict):
            raise QueryError("the request body must be a JSON object")
        raw_terms = data.get("terms")
        if not isinstance(raw_terms, list) or not raw_terms:
            raise QueryError("terms must be a non-empty list")
        if len(raw_terms) > max_terms:
            raise QueryError(f"a query takes at most {max_terms} terms")
        terms = []
        for raw in raw_terms:
            if not isinstance(raw, dict):
                raise QueryError("each term must be an object with text, image or image_id")
            unknown = set(raw) - {"text", "image", "image_id", "weight"}
            if unknown:
                raise QueryError(f"unknown term field {sorted(unknown)[0]!r}")
            weight = raw.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise QueryError("a term's weight must be a number")
            image = raw.get("image")
            if image is not None:
                if not isinstance(image, str):
                    raise QueryError("a term's image must be base64 text")
                try:
                    image = base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    raise QueryError("a term's image is not valid base64") from None
            text = raw.get("text")
            if text is not None and not isinstance(text, str):
                raise QueryError("a term's text must be a string")
            image_id = raw.get("image_id")
            if image_id is not None:
                image_id = _int(image_id, "image_id")
            terms.append(Term(text=text, image=image, image_id=image_id, weight=float(weight)))
        unknown = set(data) - {"terms", "target", "k", "offset", "cutoff", "filters", "mode", "dedupe", "sort"}
        if unknown:
            raise QueryError(f"unknown field {sorted(unknown)[0]!r}")
        dedupe = data.get("dedupe", False)
        if not isinstance(dedupe, bool):
            raise QueryError("dedupe must be true or false")
        return cls(terms=tuple(terms), target=str(data.get("target", "images")), k=_int(data.get("k", 10), "k"),
                   offset=_int(data.get("offset", 0), "offset"), cutoff=data.get("cutoff"),
                   filters=Filters.from_dict(data.get("filters")), mode=str(data.get("mode", "vector")),
                   dedupe=dedupe, sort=str(data.get("sort", "relevance")))
