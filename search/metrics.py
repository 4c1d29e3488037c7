"""Retrieval recall@k, following CLIP_benchmark's zero-shot retrieval convention.

text→image: for each caption, a hit at k when its own image ranks in the top k among all images.
image→text: for each image, a hit at k when any of its captions ranks in the top k among all captions.
A rank is 1 + the number of wrong candidates scoring at least as high as the correct one: ties count against the
correct item (real datasets repeat captions word for word), so a collapsed model cannot score well by tying.
"""
from __future__ import annotations

import numpy as np

from .errors import QueryError

KS = (1, 5, 10)
_BLOCK = 1024  # rows of the score matrix computed at once: bounds memory at BLOCK x max(N_images, N_captions)


def text_to_image_ranks(image_vectors: np.ndarray, caption_vectors: np.ndarray,
                        caption_image_ids: np.ndarray) -> np.ndarray:
    """1-based rank of each caption's own image."""
    ranks = np.empty(len(caption_vectors), np.int64)
    for start in range(0, len(caption_vectors), _BLOCK):
        stop = start + _BLOCK
        scores = np.asarray(caption_vectors[start:stop], np.float32) @ np.asarray(image_vectors, np.float32).T
        correct = scores[np.arange(len(scores)), caption_image_ids[start:stop]]
        ranks[start:stop] = (scores >= correct[:, None]).sum(axis=1)  # counts the correct image itself once
    return ranks


def image_to_text_ranks(image_vectors: np.ndarray, caption_vectors: np.ndarray,
                        caption_image_ids: np.ndarray) -> np.ndarray:
    """1-based rank of the best-ranked caption of each image (images without captions are left out)."""
    n_images = len(image_vectors)
    has_caption = np.bincount(caption_image_ids, minlength=n_images) > 0
    ranks = np.full(n_images, np.iinfo(np.int64).max, np.int64)
    captions = np.asarray(caption_vectors, np.float32)
    for start in range(0, n_images, _BLOCK):
        stop = min(start + _BLOCK, n_images)
        scores = np.asarray(image_vectors[start:stop], np.float32) @ captions.T  # [block, n_captions]
        # the best score among each image's own captions is the one whose rank counts
        own = caption_image_ids[None, :] == np.arange(start, stop)[:, None]
        best_own = np.where(own, scores, -np.inf).max(axis=1)
        ranks[start:stop] = 1 + ((scores >= best_own[:, None]) & ~own).sum(axis=1)
    return ranks[has_caption]


def summarize(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict:
    summary = {f"R@{k}": round(float(np.mean(ranks <= k) * 100), 4) for k in ks}
    summary["mean_rank"] = round(float(np.mean(ranks)), 4)
    summary["median_rank"] = float(np.median(ranks))
    return summary


def index_recall(image_index, caption_index, image_vectors: np.ndarray, caption_vectors: np.ndarray,
                 caption_image_ids: np.ndarray, ks: tuple[int, ...] = KS) -> dict:
    """Recall@k when the FAISS indexes in use answer the queries (approximate ones may miss); ranks beyond max(ks)
    are not known, so only recall is reported."""
    caption_image_ids = np.asarray(caption_image_ids, np.int64)
    kmax = max(ks)
    found_images = image_index.search(np.asarray(caption_vectors, np.float32), kmax)[1]
    t2i = found_images == caption_image_ids[:, None]
    found_captions = caption_index.search(np.asarray(image_vectors, np.float32), kmax)[1]
    owners = np.where(found_captions >= 0, caption_image_ids[np.maximum(found_captions, 0)], -1)
    i2t = (owners == np.arange(len(image_vectors))[:, None])[np.bincount(caption_image_ids,
                                                                       minlength=len(image_vectors)) > 0]
    return {direction: {f"R@{k}": round(float(np.mean(hits[:, :k].any(axis=1)) * 100), 4) for k in ks}
            for direction, hits in (("text_to_image", t2i), ("image_to_text", i2t))}


def retrieval_metrics(image_vectors: np.ndarray, caption_vectors: np.ndarray,
                      caption_image_ids: np.ndarray, ks: tuple[int, ...] = KS) -> dict:
    """Recall@k (percent), mean and median rank in both directions, in `search eval --json`'s shape."""
    caption_image_ids = np.asarray(caption_image_ids, np.int64)
    if len(caption_vectors) == 0:
        raise QueryError("the index has no captions, so recall cannot be measured (index a captioned dataset)")
    return {
        "text_to_image": summarize(text_to_image_ranks(image_vectors, caption_vectors, caption_image_ids), ks),
        "image_to_text": summarize(image_to_text_ranks(image_vectors, caption_vectors, caption_image_ids), ks),
        "n_images": int(len(image_vectors)),
        "n_captions": int(len(caption_vectors)),
    }
