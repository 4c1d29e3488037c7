"""`python -m search query|eval`: search an index from the command line and measure its recall@k."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


from .cli_common import CliParser, add_model_args, run_cli
from .images import ImageSource, load_image
from .evaluation import evaluate
from .metrics import TIES
from .searcher import TARGETS, SearchConfig, Searcher, check_paging, checked_text
from .store import open_index


def _checked_query(args: argparse.Namespace, config: SearchConfig) -> dict[str, str | ImageSource]:
    """The query for Searcher.search, checked against the limits it enforces, so that bad arguments fail before the
    model is loaded (seconds); an image query is decoded here, once."""
    check_paging(args.k, 0, config)
    if args.image is not None:
        return {"image": load_image(Path(args.image), config.max_megapixels)}
    return {"text": checked_text(args.text, config)}


def _query(args: argparse.Namespace) -> int:
    config = SearchConfig()
    query = _checked_query(args, config)
    searcher = Searcher.open(args.index, args.model, args.pretrained, args.device, config,  # index checked first
                             precision=args.precision, runtime=args.runtime)
    hits = searcher.search(**query, target=args.target, k=args.k)
    if args.json:
        print(json.dumps({"results": [h.to_json() for h in hits]}, ensure_ascii=False, indent=2))
        return 0
    for hit in hits:
        text = hit.caption if hit.caption is not None else (hit.captions[0] if hit.captions else "")
        where = f"  [{hit.image}]" if hit.caption is not None else f"  {hit.image}"
        print(f"{hit.rank:>4}  {hit.score:7.4f}{where}  {text}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    metrics = evaluate(open_index(args.index), ties=args.ties)
    print(json.dumps(metrics.to_json(), indent=2) if args.json else metrics.format())
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m search", description="Search an index; measure recall@k.")
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
    evaluation.add_argument("--ties", choices=TIES, default="clip_benchmark",
                            help="which equally scored candidates make the top k: clip_benchmark = those torch.topk "
                                 "keeps, as CLIP_benchmark (default); position = the lower index first; strict = "
                                 "wrong ones before the correct one")
    evaluation.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda args: args.func(args), make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
