"""`python -m indexer duplicates`: groups of images an index holds more than once.

Tier "exact": files with the same bytes (the SHA-1 the catalog records for every indexed file), whatever their names
or folders. The looser tiers of issue 13 (near-duplicates: resized, recompressed, slightly cropped copies; merely
similar photos) need a threshold calibrated on generated copies and are not built yet, so the command offers only
this tier.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from search.errors import DatasetError

TIERS = ("exact",)


@dataclass(frozen=True)
class DuplicateGroup:
    ids: tuple[int, ...]  # image ids, ascending; the first is the one a deduplicated view keeps
    paths: tuple[str, ...]
    size: int  # bytes of one file

    def to_json(self) -> dict:
        return {"ids": list(self.ids), "paths": list(self.paths), "bytes": self.size}


@dataclass(frozen=True)
class DuplicateReport:
    index: str
    tier: str
    n_images: int
    groups: tuple[DuplicateGroup, ...]

    @property
    def redundant(self) -> int:
        """Files beyond the first of each group."""
        return sum(len(g.ids) - 1 for g in self.groups)

    @property
    def redundant_bytes(self) -> int:
        return sum((len(g.ids) - 1) * g.size for g in self.groups)

    def to_json(self) -> dict:
        return {"index": self.index, "tier": self.tier, "images": self.n_images, "redundant": self.redundant,
                "redundant_bytes": self.redundant_bytes, "groups": [g.to_json() for g in self.groups]}


def find_duplicates(index: Path | str, tier: str = "exact") -> DuplicateReport:
    """The duplicate groups of `index` in `tier`. DatasetError when the index recorded no file hashes (built from an
    embedding folder without --images), since then nothing can be said."""
    from search.store import open_index  # FAISS: loaded by the command, not by the parser that names TIERS

    if tier not in TIERS:
        raise DatasetError(f"unknown duplicate tier '{tier}' (available: {', '.join(TIERS)})")
    stored = open_index(index)
    if stored.manifest.n_images and not stored.catalog.hashed_images():
        raise DatasetError(f"{index} records no file hashes (built from embeddings without --images): build it with "
                           f"--images to find identical files")
    groups = tuple(DuplicateGroup(tuple(r.id for r in group), tuple(r.path for r in group), group[0].size)
                   for group in stored.catalog.same_content_groups())
    return DuplicateReport(str(index), tier, stored.manifest.n_images, groups)
