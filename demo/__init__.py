"""The offline demo: a generated scene dataset (scenes.py), a small CLIP trained on it and an index of its held-out
test split (prepare.py). A client of search/ and indexer/; `python -m web --demo` is its command-line edge."""
from .prepare import SCALES, DemoConfig, DemoResult, prepare_demo, summary

__all__ = ["SCALES", "DemoConfig", "DemoResult", "prepare_demo", "summary"]
