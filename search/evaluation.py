"""Evaluating an index: recall@k over its stored vectors and through its FAISS indexes (`search eval`, the demo, the
benchmarks), and the table a person reads."""
from __future__ import annotations

import numpy as np

from .metrics import repeated_texts, retrieval_metrics
from .store import StoredIndex


def evaluate(index: StoredIndex, ties: str = "clip_benchmark") -> dict:
    """Exact recall@k over the stored vectors (no model is needed, they were encoded at build time), how many caption
    texts repeat, and recall through the FAISS indexes in use; `ties` is a rule of search.metrics.TIES."""
    caption_image_ids = np.asarray(index.catalog.caption_image_ids(), np.int64)
    images, captions = index.vectors("images"), index.vectors("captions")
    metrics = retrieval_metrics(images, captions, caption_image_ids, ties=ties, indexes=(index.images, index.captions))
    searched = metrics.pop("index_search")
    texts = index.catalog.captions(range(len(caption_image_ids)))
    metrics.update(repeated_texts(record.text for record in texts.values()))
    metrics["index_search"] = {"factories": {"images": index.images.factory, "captions": index.captions.factory},
                               "params": {"images": index.images.params, "captions": index.captions.params},
                               **searched}
    return metrics


TIE_RULES = {"clip_benchmark": "torch.topk picks among them, as CLIP_benchmark (--ties clip_benchmark)",
             "position": "the lower index ranks first (--ties position)",
             "strict": "wrong candidates rank ahead of the correct one (--ties strict)"}


def format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['n_images']} images, {metrics['n_captions']} captions (exact search)"]
    if "repeated_caption_texts" in metrics:
        lines.append(f"{metrics['repeated_caption_texts']} caption texts occur more than once "
                     f"({metrics['captions_with_repeated_text']} captions)")
    if "ties" in metrics:
        lines.append(f"equal scores: {TIE_RULES[metrics['ties']]}")
    lines.append(f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>11}{'median':>8}")
    for key, label in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
        m = metrics[key]
        lines.append(f"{label:14}{m['R@1']:8.2f}{m['R@5']:8.2f}{m['R@10']:8.2f}{m['mean_rank']:11.2f}"
                     f"{m['median_rank']:8.1f}")
    searched = metrics.get("index_search")
    if searched:
        factories = searched["factories"]
        lines.append(f"through the indexes in use (images: {factories['images']} {searched['params']['images'] or ''},"
                     f" captions: {factories['captions']} {searched['params']['captions'] or ''}):")
        for key, label in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
            m = searched[key]
            lines.append(f"{label:14}{m['R@1']:8.2f}{m['R@5']:8.2f}{m['R@10']:8.2f}")
    return "\n".join(lines)
