"""Evaluating an index: recall@k over its stored vectors and through its FAISS indexes (`search eval`, the demo, the
benchmarks). The result's `format()` is the table a person reads, `to_json()` the `--json` shape."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import QueryError
from .metrics import repeated_texts, retrieval_metrics
from .per_query import PerQuery
from .query_features import LANGUAGES, caption_language
from .recall import LanguageRecall, RetrievalMetrics
from .store import StoredIndex


def evaluate(index: StoredIndex, ties: str = "clip_benchmark") -> RetrievalMetrics:
    """Exact recall@k over the stored vectors (no model is needed, they were encoded at build time), how many caption
    texts repeat, and recall through the FAISS indexes in use; `ties` is a rule of search.metrics.TIES.
    NoCaptionsError for an index without captions. When the captions are in more than one language (Chinese and
    English: search.query_features.caption_language), also recall per language (`languages`, exact search)."""
    caption_image_ids = np.asarray(index.catalog.caption_image_ids(), np.int64)
    images, captions = index.vectors("images"), index.vectors("captions")
    metrics = retrieval_metrics(images, captions, caption_image_ids, ties=ties, indexes=(index.images, index.captions))
    texts = index.catalog.captions(range(len(caption_image_ids)))
    languages = np.asarray([caption_language(texts[i].text) for i in range(len(caption_image_ids))])
    return replace(metrics, **repeated_texts(record.text for record in texts.values()),
                   factories={"images": index.images.factory, "captions": index.captions.factory},
                   params={"images": index.images.params, "captions": index.captions.params},
                   languages=per_language(images, captions, caption_image_ids, languages, ties))


def per_language(images: np.ndarray, captions: np.ndarray, caption_image_ids: np.ndarray, languages: np.ndarray,
                 ties: str = "clip_benchmark") -> tuple[LanguageRecall, ...] | None:
    """Recall over each language's captions (`languages`: a code per caption), in LANGUAGES order; None when all
    captions are in one language. Text→image of a language is the full text→image over those caption queries alone;
    image→text ranks only that language's captions (images without one are left out, as always)."""
    present = [code for code, _ in LANGUAGES if (languages == code).any()]
    if len(present) < 2:
        return None
    found = []
    for code in present:
        chosen = np.flatnonzero(languages == code)
        recall = retrieval_metrics(images, captions[chosen], caption_image_ids[chosen], ties=ties).recall
        found.append(LanguageRecall(code, len(chosen), recall))
    return tuple(found)



CLIP_BENCHMARK_KS = (1, 5, 10)


CLIP_BENCHMARK_NAMES = {"flickr8k": "flickr8k", "coco": "mscoco_captions"}  # our --format → its dataset name


def dataset_name(index: StoredIndex) -> str:
    """A dataset name for CLIP_benchmark's result JSON: its own name for Flickr8k's files ("flickr8k") and COCO
    ("mscoco_captions"), the annotation file's stem without Karpathy's 'dataset_' prefix (dataset_flickr30k.json →
    flickr30k), else the index directory's name."""
    source = index.manifest.source
    if source.get("format") in CLIP_BENCHMARK_NAMES:
        return CLIP_BENCHMARK_NAMES[source["format"]]
    annotations = source.get("annotations")
    if annotations:
        stem = Path(annotations).stem
        return stem[len("dataset_"):] if stem.startswith("dataset_") and len(stem) > len("dataset_") else stem
    return index.path.resolve().name


def clip_benchmark_result(index: StoredIndex, outcomes: PerQuery, dataset: str | None = None,
                          ks: tuple[int, ...] = CLIP_BENCHMARK_KS) -> dict:
    """CLIP_benchmark's zero-shot retrieval result JSON, as its CLI writes it: recall as float32 fractions (0–1),
    `image_retrieval` = text→image, `text_retrieval` = image→text; `outcomes` measured with its tie rule."""
    if outcomes.ties != "clip_benchmark":
        raise QueryError("CLIP_benchmark's numbers use its own tie rule (--ties clip_benchmark)")
    metrics = {}
    for k in ks:
        for key, kind in (("image_retrieval", "text_to_image"), ("text_retrieval", "image_to_text")):
            hits = outcomes.hit(kind, k)  # CLIP_benchmark: (hits > 0).float().mean().item(), a float32 mean
            metrics[f"{key}_recall@{k}"] = float(np.float32(int(hits.sum())) / np.float32(len(hits)))
    spec = index.manifest.encoder
    return {"dataset": dataset or dataset_name(index), "model": spec.model, "pretrained": spec.pretrained,
            "task": "zeroshot_retrieval", "metrics": metrics, "language": "en"}
