"""Calibrating the near and similar duplicate tiers of one index on augmented copies of its own photos.

At build/update time, before the writer commits: a seeded sample of the indexed images (SAMPLE_SIZE at most) is read
again with the safe decoder, and each gets COPIES_PER_TIER copies per tier, made in memory —
near: cropped <= 5 % per side, resized to 50-80 %, brightness +-10 %, re-encoded as JPEG (quality 30-70), PNG or WebP;
similar: 15-30 % of the width and of the height cropped away, mirrored half the time, colours shifted, rotated
<= 10 degrees —
and encoded with the index's encoder (about 130 images whatever the index's size). Positives are the pairs
(original's indexed vector, its copy), negatives the pairs (original, one of its NEGATIVES_PER_IMAGE nearest *other*
indexed images, byte-identical files passed over). Per tier the threshold maximising TPR - FPR (ties: the highest,
for precision) is fitted on one half of the sample and its precision and recall measured on the other half
(seeded: the same index gives the same numbers). The similar tier is the looser one by construction: its threshold
is the highest that keeps SIMILAR_RECALL of the fitting half's similar copies (heavy edits often score below the
nearest other photos, so no threshold separates them cleanly; the tier then says how precise it is rather than
pretending), and never above the near one, so every near group lies inside a similar group.

An index may already hold copies of a sampled photo: a neighbour at least as alike as one of the near copies made
of the photo counts as such a copy and is passed over, not taken as "another image" (else a collection full of
duplicates would teach that duplicates are other photos). So very close distinct photos (bursts) fall on the
duplicate side.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from search.encoders import Encoder
from search.errors import ImageReadError
from search.images import ALLOWED_FORMATS, load_image
from search.layout import RAW_VECTOR_FILES

from .writer import IndexWriter

log = logging.getLogger(__name__)

SAMPLE_SIZE = 32
COPIES_PER_TIER = 2  # 32 images x 2 tiers x 2 copies = 128 encodes per calibration
NEGATIVES_PER_IMAGE = 2  # as many "other image" pairs as copies: balanced classes
CANDIDATES = 8  # nearest others looked at per image, so that byte-identical files can be passed over
MIN_IMAGES = 4  # fewer readable images than this: no calibration (the fallback thresholds apply)
SEED = 13
SIMILAR_RECALL = 0.9  # share of heavily edited copies of a photo the similar tier must group with it
SCAN_ROWS = 65536  # indexed vectors compared with the sample at a time
ENCODE_BATCH = 32
NEAR_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP") if f in ALLOWED_FORMATS)

Records = Callable[[list[int]], dict[int, tuple[str, str]]]  # image ids -> {id: (path, sha1)}


def _decoded(image: Image.Image, fmt: str, **options) -> Image.Image:
    """`image` encoded as `fmt` and read back with the safe decoder: the copy a user would have on disk."""
    data = io.BytesIO()
    image.save(data, fmt, **options)
    return load_image(data.getvalue(), name=f"{fmt} copy")


def _crop(image: Image.Image, fractions: np.ndarray) -> Image.Image:
    """Crop (left, top, right, bottom) fractions of the width/height away, keeping at least one pixel."""
    w, h = image.size
    left, top = int(fractions[0] * w), int(fractions[1] * h)
    right, bottom = max(left + 1, w - int(fractions[2] * w)), max(top + 1, h - int(fractions[3] * h))
    return image.crop((left, top, right, bottom))


def near_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate: cropped <= 5 % per side, resized to 50-80 %, brightness +-10 %, re-encoded."""
    copy = _crop(image, rng.uniform(0, 0.05, 4))
    scale = rng.uniform(0.5, 0.8)
    copy = copy.resize((max(1, round(copy.width * scale)), max(1, round(copy.height * scale))),
                       Image.Resampling.BICUBIC)
    copy = ImageEnhance.Brightness(copy).enhance(rng.uniform(0.9, 1.1))
    fmt = NEAR_FORMATS[rng.integers(len(NEAR_FORMATS))]
    options = {"JPEG": {"quality": int(rng.integers(30, 71))}, "WEBP": {"quality": int(rng.integers(50, 91))}}
    return _decoded(copy, fmt, **options.get(fmt, {}))


def similar_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A similar photo: 15-30 % of each side cropped away, mirrored half the time, colours shifted, rotated <= 10°."""
    kept = 1 - rng.uniform(0.15, 0.30, 2)  # of the width, of the height
    start = rng.uniform(0, 1 - kept)
    copy = _crop(image, np.array([start[0], start[1], 1 - kept[0] - start[0], 1 - kept[1] - start[1]]))
    if rng.random() < 0.5:
        copy = ImageOps.mirror(copy)
    copy = ImageEnhance.Color(copy).enhance(rng.uniform(0.6, 1.4))
    gains = rng.uniform(0.85, 1.15, 3)
    copy = Image.fromarray(np.clip(np.asarray(copy, np.float32) * gains, 0, 255).astype(np.uint8))
    copy = copy.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC)
    return _decoded(copy, "JPEG", quality=85)


COPIERS = {"near": near_copy, "similar": similar_copy}


def fit_threshold(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The cosine threshold (midway between two observed scores) maximising TPR - FPR; ties: the highest."""
    scores = np.unique(np.concatenate([positives, negatives]))
    candidates = np.concatenate([[scores[0] - 1e-3], (scores[:-1] + scores[1:]) / 2, [scores[-1] + 1e-3]])
    tpr = (positives[None, :] >= candidates[:, None]).mean(axis=1)
    fpr = (negatives[None, :] >= candidates[:, None]).mean(axis=1) if len(negatives) else np.zeros(len(candidates))
    gain = tpr - fpr
    return float(candidates[np.flatnonzero(gain == gain.max())[-1]])


def measure(threshold: float, positives: np.ndarray, negatives: np.ndarray) -> dict:
    """Precision and recall of "cosine >= threshold" on labelled pairs (precision None when nothing is above)."""
    true, false = int((positives >= threshold).sum()), int((negatives >= threshold).sum())
    return {"threshold": round(threshold, 6),
            "precision": round(true / (true + false), 4) if true + false else None,
            "recall": round(true / len(positives), 4) if len(positives) else None,
            "pairs": int(len(positives) + len(negatives))}


def _nearest_others(vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the CANDIDATES + 1 indexed images nearest each of `ids` (itself included), best first."""
    queries = _unit(vectors[ids])
    k = min(CANDIDATES + 1, len(vectors))
    best_scores = np.full((len(ids), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(ids), 0), np.int64)
    for start in range(0, len(vectors), SCAN_ROWS):
        scores = queries @ _unit(vectors[start:start + SCAN_ROWS]).T
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + scores.shape[1]),
                                                             scores.shape)], axis=1)
        top = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, top, 1), np.take_along_axis(best_ids, top, 1)
    return best_scores, best_ids


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))


def calibrate(vectors: np.ndarray, records: Records, images_root: Path, encoder: Encoder,
              max_megapixels: float, seed: int = SEED) -> dict:
    """`{tier: {"threshold", "precision", "recall", "pairs"}}` for the near and similar tiers of the index whose
    image vectors are `vectors` (row = image id; `records(ids)` gives their paths under `images_root` and SHA-1s),
    or {} when fewer than MIN_IMAGES sampled images can be read again (the fallback thresholds then apply)."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    if n < MIN_IMAGES:
        return {}
    sample = np.sort(rng.choice(n, min(SAMPLE_SIZE, n), replace=False))
    known = records(sample.tolist())
    originals, images = [], []
    for image_id in sample.tolist():
        try:
            images.append(load_image(Path(images_root) / known[image_id][0], max_megapixels))
            originals.append(image_id)
        except (ImageReadError, KeyError):  # gone or changed since it was read: sample the rest
            continue
    if len(originals) < MIN_IMAGES:
        return {}
    # every copy drawn from one generator in a fixed order: the same index gives the same copies
    copies = {tier: [[copier(image, rng) for _ in range(COPIES_PER_TIER)] for image in images]
              for tier, copier in COPIERS.items()}
    own = _unit(vectors[np.asarray(originals)])
    positives = {tier: _copy_scores(encoder, own, made) for tier, made in copies.items()}
    negatives = _negative_scores(vectors, np.asarray(originals), records, positives["near"].min(axis=1))
    order = rng.permutation(len(originals))
    fit, held = order[:len(order) // 2], order[len(order) // 2:]
    result: dict = {}
    for tier in COPIERS:  # near first: the similar threshold is capped at it
        if tier == "near":
            threshold = fit_threshold(positives[tier][fit].ravel(), negatives[fit].ravel())
        else:
            threshold = min(float(np.quantile(positives[tier][fit].ravel(), 1 - SIMILAR_RECALL)),
                            result["near"]["threshold"])
        result[tier] = measure(threshold, positives[tier][held].ravel(), negatives[held].ravel())
    return result


def _copy_scores(encoder: Encoder, own: np.ndarray, copies: list[list[Image.Image]]) -> np.ndarray:
    """[images, COPIES_PER_TIER] cosines between each original's indexed vector and its copies' vectors."""
    flat = [encoder.preprocess_image(copy) for made in copies for copy in made]
    vectors = np.concatenate([encoder.encode_pixels(np.stack(flat[i:i + ENCODE_BATCH]))
                              for i in range(0, len(flat), ENCODE_BATCH)])
    return np.einsum("icd,id->ic", _unit(vectors).reshape(len(copies), COPIES_PER_TIER, -1), own)


def _negative_scores(vectors: np.ndarray, originals: np.ndarray, records: Records,
                     copy_scores: np.ndarray) -> np.ndarray:
    """[images, NEGATIVES_PER_IMAGE] cosines to the nearest other indexed images, passing over byte-identical files
    and images at least as alike as a near copy made of the photo (copies the index holds already), a row short of
    candidates repeating its last one. `copy_scores`: per original, its weakest near copy's cosine."""
    scores, ids = _nearest_others(vectors, originals)
    hashes = {i: sha1 for i, (_, sha1) in records(sorted(set(ids.ravel().tolist()) | set(originals.tolist()))).items()}
    rows = []
    for image_id, row_scores, row_ids, ceiling in zip(originals.tolist(), scores, ids, copy_scores.tolist()):
        same = hashes.get(image_id) or None
        kept = [s for s, j in zip(row_scores.tolist(), row_ids.tolist())
                if j != image_id and (same is None or hashes.get(j) != same) and s < ceiling][:NEGATIVES_PER_IMAGE]
        kept = kept or [float(row_scores[-1])]
        rows.append(kept + [kept[-1]] * (NEGATIVES_PER_IMAGE - len(kept)))
    return np.asarray(rows, np.float32)


def calibrate_build(writer: IndexWriter, images_root: Path, encoder: Encoder, max_megapixels: float) -> dict:
    """`calibrate` over the index `writer` is writing (its raw vectors and catalog, after its last checkpoint), with
    its one log line. Called by the build and update pipelines before the writer commits."""
    if writer.n_images == 0:
        return {}
    vectors = np.memmap(writer.tmp / RAW_VECTOR_FILES["images"], np.float32, "r", shape=(writer.n_images, writer.dim))
    result = calibrate(vectors, writer.catalog.identities, images_root, encoder, max_megapixels)
    if not result:
        log.info("near-duplicate calibration skipped: fewer than %d readable images (fallback thresholds apply)",
                 MIN_IMAGES)
    else:
        log.info("near-duplicate calibration: %s", "; ".join(
            f"{tier} cosine >= {r['threshold']:.3f} (precision {r['precision']}, recall {r['recall']}, "
            f"{r['pairs']} held-out pairs)" for tier, r in result.items()))
    return result
