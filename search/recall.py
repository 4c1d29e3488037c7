"""Recall results as values: what search.metrics computes, `search eval` prints, training.json and the demo's
recall.json store.

`to_json()` gives the stable JSON shapes (`search eval --json`, a training epoch's "val", recall.json) and `format()`
the text a person reads; nothing else formats R@k. `from_json` reads the shapes back (e.g. a training.json record).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .query_features import LANGUAGES

# (JSON key, label) of the two retrieval directions, in the order everything lists them
DIRECTIONS = (("text_to_image", "text→image"), ("image_to_text", "image→text"))

TIE_RULES = {"clip_benchmark": "torch.topk picks among them, as CLIP_benchmark (--ties clip_benchmark)",
             "position": "the lower index ranks first (--ties position)",
             "strict": "wrong candidates rank ahead of the correct one (--ties strict)"}


@dataclass(frozen=True)
class Recall:
    """One direction: recall@k in percent (100 * hits / queries, unrounded) per k, and the mean and median rank of
    the first correct candidate when known (recall through a FAISS index knows no ranks)."""

    at: Mapping[int, float]
    mean_rank: float | None = None
    median_rank: float | None = None

    def to_json(self) -> dict:
        data = {f"R@{k}": value for k, value in self.at.items()}
        if self.mean_rank is not None:
            data.update(mean_rank=self.mean_rank, median_rank=self.median_rank)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "Recall":
        return cls({int(key[2:]): value for key, value in data.items() if key.startswith("R@")},
                   data.get("mean_rank"), data.get("median_rank"))

    def format(self, digits: int = 1, ks: tuple[int, ...] | None = None) -> str:
        """'R@1/5/10 41.2/70.3/80.9' (or the `ks` given)."""
        ks = tuple(self.at) if ks is None else ks
        return f"R@{'/'.join(map(str, ks))} {'/'.join(f'{self.at[k]:.{digits}f}' for k in ks)}"

    def columns(self) -> str:
        """The row of `search eval`'s table: R@k in 8-wide columns, then the ranks when known."""
        text = "".join(f"{value:8.2f}" for value in self.at.values())
        if self.mean_rank is not None:
            text += f"{self.mean_rank:11.2f}{self.median_rank:8.1f}"
        return text


@dataclass(frozen=True)
class RetrievalRecall:
    """Both directions: text→image (is a caption's own image in the top k images?) and image→text."""

    text_to_image: Recall
    image_to_text: Recall

    def to_json(self) -> dict:
        return {key: getattr(self, key).to_json() for key, _ in DIRECTIONS}

    @classmethod
    def from_json(cls, data: Mapping) -> "RetrievalRecall":
        """From any mapping holding the two directions (other keys are ignored)."""
        return cls(*(Recall.from_json(data[key]) for key, _ in DIRECTIONS))

    def format(self, digits: int = 1, ks: tuple[int, ...] | None = None) -> str:
        """'text→image R@1/5/10 41.2/70.3/80.9, image→text R@1/5/10 52.0/80.1/88.7'."""
        return ", ".join(f"{label} {getattr(self, key).format(digits, ks)}" for key, label in DIRECTIONS)

    def rows(self) -> list[str]:
        return [f"{label:14}{getattr(self, key).columns()}" for key, label in DIRECTIONS]


@dataclass(frozen=True)
class LanguageRecall:
    """Recall over the captions of one language (search.query_features.caption_language): text→image with those
    captions as queries (among all images), image→text with only those captions as candidates."""

    language: str
    n_captions: int
    recall: RetrievalRecall

    def to_json(self) -> dict:
        return {"n_captions": self.n_captions, **self.recall.to_json()}


@dataclass(frozen=True)
class RetrievalMetrics:
    """Recall of a set of vectors by exact search (with ranks), optionally through the FAISS indexes in use, and what
    `search eval` adds about the index (repeated caption texts, the indexes' factories and parameters)."""

    recall: RetrievalRecall
    n_images: int
    n_captions: int
    ties: str
    index_search: RetrievalRecall | None = None
    # how many caption texts occur more than once, and how many captions they make up (search.metrics.repeated_texts)
    repeated_caption_texts: int | None = None
    captions_with_repeated_text: int | None = None
    factories: Mapping[str, str] | None = None  # per kind ('images', 'captions'), of the indexes searched
    params: Mapping[str, dict | None] | None = None
    # per caption language, when the captions are in more than one (search.evaluation.evaluate), else None
    languages: tuple[LanguageRecall, ...] | None = None

    def to_json(self) -> dict:
        """`search eval --json`'s shape (a training epoch's "val" has the first five keys)."""
        data = {**self.recall.to_json(), "n_images": self.n_images, "n_captions": self.n_captions, "ties": self.ties}
        if self.repeated_caption_texts is not None:
            data.update(repeated_caption_texts=self.repeated_caption_texts,
                        captions_with_repeated_text=self.captions_with_repeated_text)
        if self.index_search is not None:
            indexes = {} if self.factories is None else {"factories": dict(self.factories),
                                                         "params": dict(self.params or {})}
            data["index_search"] = {**indexes, **self.index_search.to_json()}
        if self.languages is not None:
            data["languages"] = {item.language: item.to_json() for item in self.languages}
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "RetrievalMetrics":
        searched = data.get("index_search") or {}
        languages = data.get("languages")
        return cls(RetrievalRecall.from_json(data), data["n_images"], data["n_captions"], data["ties"],
                   RetrievalRecall.from_json(searched) if searched else None, data.get("repeated_caption_texts"),
                   data.get("captions_with_repeated_text"), searched.get("factories"), searched.get("params"),
                   None if languages is None else tuple(
                       LanguageRecall(code, item["n_captions"], RetrievalRecall.from_json(item))
                       for code, item in languages.items()))

    def format(self) -> str:
        """The table `search eval` prints."""
        lines = [f"{self.n_images} images, {self.n_captions} captions (exact search)"]
        if self.repeated_caption_texts is not None:
            lines.append(f"{self.repeated_caption_texts} caption texts occur more than once "
                         f"({self.captions_with_repeated_text} captions)")
        lines.append(f"equal scores: {TIE_RULES[self.ties]}")
        header = "".join(f"R@{k}".rjust(8) for k in self.recall.text_to_image.at)
        lines.append(f"{'':14}{header}{'mean rank':>11}{'median':>8}")
        lines += self.recall.rows()
        if self.index_search is not None:
            if self.factories is not None:
                params = self.params or {}
                used = ", ".join(f"{kind}: {' '.join(str(part) for part in (self.factories[kind], params.get(kind)) if part)}"
                                 for kind in ("images", "captions"))
                lines.append(f"through the indexes in use ({used}):")
            else:
                lines.append("through the indexes in use:")
            lines += self.index_search.rows()
        for item in self.languages or ():
            name = dict(LANGUAGES).get(item.language, item.language)
            lines.append(f"{name} captions only ({item.n_captions}; image→text ranks these captions alone):")
            lines += item.recall.rows()
        return "\n".join(lines)
