"""Duplicates in three tiers over one index: collapse a ranked hit list, list groups. numpy only (no torch, no FAISS).

- exact: byte-identical files (the SHA-1 the catalog records);
- near: resized, recompressed, slightly cropped or re-encoded copies of one photo;
- similar: a looser tier (heavier crops, flips, colour shifts, small rotations: "the same scene").

near and similar are cosine thresholds on the image vectors, calibrated per index at build/update time on augmented
copies of its own photos (indexer/near_duplicates.py) and stored in `Manifest.near_duplicates` as
`{tier: {"threshold", "precision", "recall", "pairs"}}`. An index without a calibration (built from embeddings, or by
an older version) uses FALLBACK_THRESHOLDS, which were not measured on it: callers say so.

Groups are the connected components of the graph "cosine >= threshold" (single linkage), joined with the exact
groups: a copy of a copy lands in one group with the original even when the two ends are further apart than the
threshold. The price is chaining: a loose threshold over a dense collection can join a long series of photos. Each
component is listed with every member's cosine to its first (lowest) id, so a chain shows as low scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import DatasetError

if TYPE_CHECKING:  # opening an index loads FAISS: callers pass one in
    from .store import StoredIndex

TIERS = ("exact", "near", "similar")
VECTOR_TIERS = ("near", "similar")
# Used when an index carries no calibration: typical cosines of CLIP-like models for a recompressed copy and for "the
# same scene", an informed guess, not a measurement on the index (the calibration replaces it at the next update).
FALLBACK_THRESHOLDS = {"near": 0.95, "similar": 0.85}
BLOCK_ROWS = 2048  # rows of the pairwise cosine matrix computed at a time: BLOCK_ROWS x n floats in memory


def _unit(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (float16 on-disk vectors and rounding both end here)."""
    rows = np.asarray(vectors, np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))


def collapse(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Positions of the hits to keep, ascending (rank order preserved): walking down the ranked hits, a hit is dropped
    when its cosine to an already kept hit is >= `threshold` or it repeats a kept id. `vectors[i]` is hit i's image
    vector. O(k^2) for k hits."""
    ids = np.asarray(ids)
    unit = _unit(vectors)
    if len(ids) != len(unit):
        raise ValueError(f"{len(ids)} ids but {len(unit)} vectors")
    gram = unit @ unit.T
    kept: list[int] = []
    seen: set = set()
    for i in range(len(ids)):
        if ids[i].item() in seen or (kept and bool((gram[i, kept] >= threshold).any())):
            continue
        kept.append(i)
        seen.add(ids[i].item())
    return np.asarray(kept, dtype=np.int64)


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)  # the lowest row is the root


def groups(vectors: np.ndarray, threshold: float,
           exact_groups: Sequence[Sequence[int]] = ()) -> list[np.ndarray]:
    """Rows of `vectors` in groups of two or more: connected components of "cosine >= threshold" joined with
    `exact_groups` (rows known to be the same file). Each group ascending, the groups by their first row.
    Blocked pairwise matmul: O(n^2 d) time, BLOCK_ROWS x n floats of memory."""
    n = len(vectors)
    parent = np.arange(n)
    for group in exact_groups:
        for row in list(group)[1:]:
            _union(parent, int(group[0]), int(row))
    for start in range(0, n, BLOCK_ROWS):
        block = _unit(vectors[start:start + BLOCK_ROWS])
        for col_start in range(start, n, BLOCK_ROWS):  # upper triangle only: cosine is symmetric
            scores = block @ _unit(vectors[col_start:col_start + BLOCK_ROWS]).T
            rows, cols = np.nonzero(scores >= threshold)
            for r, c in zip((rows + start).tolist(), (cols + col_start).tolist()):
                if c > r:
                    _union(parent, r, c)
    roots = np.fromiter((_find(parent, i) for i in range(n)), dtype=np.int64, count=n)
    members: dict[int, list[int]] = {}
    for row, root in enumerate(roots.tolist()):
        members.setdefault(root, []).append(row)
    return sorted((np.asarray(rows) for rows in members.values() if len(rows) > 1), key=lambda g: int(g[0]))


@dataclass(frozen=True)
class TierThreshold:
    """The cosine threshold of a vector tier and how it was measured (None: a fallback, not measured)."""
    tier: str
    threshold: float
    precision: float | None = None
    recall: float | None = None
    pairs: int = 0  # held-out (original, copy) and (original, other image) pairs the numbers were measured on

    @property
    def calibrated(self) -> bool:
        return self.pairs > 0

    def describe(self) -> str:
        if not self.calibrated:
            return (f"{self.tier} tier: cosine >= {self.threshold:.3f}, a fallback: this index has no duplicate "
                    f"calibration (built from embeddings or by an older version; `python -m indexer update` adds one)")
        return (f"{self.tier} tier: cosine >= {self.threshold:.3f}, calibrated on copies of this index's own photos: "
                f"precision {_percent(self.precision)}, recall {_percent(self.recall)} on {self.pairs} held-out pairs")

    def to_json(self) -> dict:
        return {"tier": self.tier, "threshold": self.threshold, "precision": self.precision, "recall": self.recall,
                "pairs": self.pairs, "calibrated": self.calibrated}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def tier_threshold(near_duplicates: dict, tier: str) -> TierThreshold:
    """The threshold of `tier` ('near' or 'similar') from a manifest's `near_duplicates`, else the fallback."""
    entry = near_duplicates.get(tier)
    if not entry:
        return TierThreshold(tier, FALLBACK_THRESHOLDS[tier])
    return TierThreshold(tier, float(entry["threshold"]), entry.get("precision"), entry.get("recall"),
                         int(entry.get("pairs", 0)))


@dataclass(frozen=True)
class DuplicateGroup:
    ids: tuple[int, ...]  # the first is the one to keep: exact tier ids ascending; vector tiers the most pixels first
    paths: tuple[str, ...]
    sizes: tuple[int, ...]  # bytes of each file (0: not recorded)
    scores: tuple[float, ...] = ()  # vector tiers: each member's cosine to the first

    @property
    def size(self) -> int:
        """Bytes of the first file (of each file, in the exact tier)."""
        return self.sizes[0]

    def to_json(self) -> dict:
        data = {"ids": list(self.ids), "paths": list(self.paths), "sizes": list(self.sizes)}
        if self.scores:
            data["scores"] = [round(s, 4) for s in self.scores]
        else:
            data["bytes"] = self.size
        return data


@dataclass(frozen=True)
class DuplicateReport:
    index: str
    tier: str
    n_images: int
    groups: tuple[DuplicateGroup, ...]
    threshold: TierThreshold | None = None  # vector tiers

    @property
    def redundant(self) -> int:
        """Files beyond the first of each group."""
        return sum(len(g.ids) - 1 for g in self.groups)

    @property
    def redundant_bytes(self) -> int:
        return sum(sum(g.sizes[1:]) for g in self.groups)

    def to_json(self) -> dict:
        data = {"index": self.index, "tier": self.tier, "images": self.n_images, "redundant": self.redundant,
                "redundant_bytes": self.redundant_bytes, "groups": [g.to_json() for g in self.groups]}
        if self.threshold is not None:
            data["threshold"] = self.threshold.to_json()
        return data


def duplicate_report(index: "StoredIndex", tier: str = "exact") -> DuplicateReport:
    """The duplicate groups of an opened index in `tier`. DatasetError for an unknown tier, or for the exact tier of
    an index that recorded no file hashes (built from an embedding folder without --images)."""
    if tier not in TIERS:
        raise DatasetError(f"unknown duplicate tier '{tier}' (available: {', '.join(TIERS)})")
    catalog, n_images = index.catalog, index.manifest.n_images
    if tier == "exact" and n_images and not catalog.hashed_images():
        raise DatasetError(f"{index.path} records no file hashes (built from embeddings without --images): build it "
                           f"with --images to find identical files")
    exact = catalog.same_content_groups()
    if tier == "exact":
        found = tuple(DuplicateGroup(tuple(r.id for r in g), tuple(r.path for r in g), tuple(r.size for r in g))
                      for g in exact)
        return DuplicateReport(str(index.path), tier, n_images, found)
    threshold = tier_threshold(index.manifest.near_duplicates, tier)
    vectors = index.vectors("images")
    rows = groups(vectors, threshold.threshold, [[r.id for r in g] for g in exact])
    records = catalog.images(np.concatenate(rows).tolist() if rows else [])
    found = []
    for group in rows:
        # the one to keep first: the most pixels (the original rather than its downsized copies), then the lowest id
        ids = sorted(group.tolist(), key=lambda i: (-records[i].width * records[i].height, i))
        scores = _unit(vectors[ids]) @ _unit(vectors[ids[:1]])[0]
        found.append(DuplicateGroup(tuple(ids), tuple(records[i].path for i in ids),
                                    tuple(records[i].size for i in ids), tuple(float(s) for s in scores)))
    return DuplicateReport(str(index.path), tier, n_images, tuple(found), threshold)
