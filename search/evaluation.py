"""Evaluating an index: recall@k over its stored vectors and through its FAISS indexes (`search eval`, the demo, the
benchmarks). The result's `format()` is the table a person reads, `to_json()` the `--json` shape."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .metrics import repeated_texts, retrieval_metrics
from .recall import RetrievalMetrics
from .store import StoredIndex


def evaluate(index: StoredIndex, ties: str = "clip_benchmark") -> RetrievalMetrics:
    """Exact recall@k over the stored vectors (no model is needed, they were encoded at build time), how many caption
    texts repeat, and recall through the FAISS indexes in use; `ties` is a rule of search.metrics.TIES.
    NoCaptionsError for an index without captions."""
    caption_image_ids = np.asarray(index.catalog.caption_image_ids(), np.int64)
    images, captions = index.vectors("images"), index.vectors("captions")
    metrics = retrieval_metrics(images, captions, caption_image_ids, ties=ties, indexes=(index.images, index.captions))
    texts = index.catalog.captions(range(len(caption_image_ids)))
    return replace(metrics, **repeated_texts(record.text for record in texts.values()),
                   factories={"images": index.images.factory, "captions": index.captions.factory},
                   params={"images": index.images.params, "captions": index.captions.params})

