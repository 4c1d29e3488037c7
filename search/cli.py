"""`python -m search query|eval`: search an index from the command line and measure its recall@k."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .cli_common import add_model_args, run_cli
from .metrics import index_recall, retrieval_metrics
from .searcher import TARGETS, Hit, Searcher
from .store import StoredIndex, open_index


def hit_to_json(hit: Hit) -> dict:
    """The stable per-result shape of `query --json` (also used by the web API)."""
    if hit.caption is not None:
        return {"rank": hit.rank, "score": round(hit.score, 6), "caption": hit.caption, "image": hit.image}
    return {"rank": hit.rank, "score": round(hit.score, 6), "image": hit.image, "captions": list(hit.captions)}


def _query(args: argparse.Namespace) -> int:
    searcher = Searcher.open(args.index, args.model, args.pretrained, args.device, precision=args.precision)
    if args.text is not None:
        hits = searcher.search(text=args.text, target=args.target, k=args.k)
    else:
        hits = searcher.search(image=Path(args.image), target=args.target, k=args.k)
    if args.json:
        print(json.dumps({"results": [hit_to_json(h) for h in hits]}, ensure_ascii=False, indent=2))
        return 0
    for hit in hits:
        text = hit.caption if hit.caption is not None else (hit.captions[0] if hit.captions else "")
        where = f"  [{hit.image}]" if hit.caption is not None else f"  {hit.image}"
        print(f"{hit.rank:>4}  {hit.score:7.4f}{where}  {text}")
    return 0


def evaluate(index: StoredIndex) -> dict:
    """Exact recall@k over the stored vectors: no model is needed, they were encoded at build time."""
    caption_image_ids = np.asarray(index.catalog.caption_image_ids(), np.int64)
    images, captions = index.vectors("images"), index.vectors("captions")
    metrics = retrieval_metrics(images, captions, caption_image_ids)
    metrics["index_search"] = {"factories": {"images": index.images.factory, "captions": index.captions.factory},
                               "params": {"images": index.images.params, "captions": index.captions.params},
                               **index_recall(index.images, index.captions, images, captions, caption_image_ids)}
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['n_images']} images, {metrics['n_captions']} captions (exact search)",
             f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>11}{'median':>8}"]
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


def _eval(args: argparse.Namespace) -> int:
    metrics = evaluate(open_index(args.index))
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search", description="Search an index; measure recall@k.")
    commands = parser.add_subparsers(dest="command", required=True)

    query = commands.add_parser("query", help="text→image, image→image or image→text search")
    query.add_argument("--index", type=Path, required=True)
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a sentence to find images for")
    what.add_argument("--image", help="an image file to find similar images (or captions) for")
    query.add_argument("--target", choices=TARGETS, default="images", help="search images or captions")
    query.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    query.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(query, default_from_index=True)
    query.set_defaults(func=_query)

    evaluation = commands.add_parser("eval", help="recall@1/5/10 and ranks over the indexed split")
    evaluation.add_argument("--index", type=Path, required=True)
    evaluation.add_argument("--json", action="store_true", help="print JSON")
    evaluation.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda args: args.func(args), make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
