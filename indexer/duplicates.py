"""`python -m indexer duplicates`: groups of images an index holds more than once, in three tiers.

exact: files with the same bytes (the SHA-1 the catalog records for every indexed file), whatever their names or
folders; near: resized, recompressed, slightly cropped or re-encoded copies; similar: a looser tier. near and similar
use the cosine thresholds calibrated when the index was built or updated (indexer/near_duplicates.py), with their
measured precision and recall; the grouping itself is search/dedupe.py (the web page uses it too).
"""
from __future__ import annotations

from pathlib import Path

from search.dedupe import TIERS, DuplicateGroup, DuplicateReport, duplicate_report

__all__ = ["TIERS", "DuplicateGroup", "DuplicateReport", "find_duplicates"]


def find_duplicates(index: Path | str, tier: str = "exact") -> DuplicateReport:
    """The duplicate groups of `index` in `tier`. DatasetError for the exact tier of an index that recorded no file
    hashes (built from an embedding folder without --images), since then nothing can be said."""
    from search.store import open_index  # FAISS: loaded by the command, not by the parser that names TIERS

    return duplicate_report(open_index(index), tier)
