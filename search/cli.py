"""`python -m search query|eval|compare|models`: search an index from the command line, measure its recall@k, compare
two, list the recommended models."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


from .cli_common import CliParser, add_model_args, run_cli
from .errors import QueryError
from .images import load_image
from .atomic import write_atomic
from .compare import compare
from .evaluation import clip_benchmark_result, evaluate
from .metrics import TIES
from .model_catalog import LANGUAGES, format_table, load_speeds, models, to_json
from .per_query import per_query
from .query import MODES, SORTS, Filters, Query, Term, parse_date
from .searcher import TARGETS, SearchConfig, Searcher, check_paging, checked_text
from .store import open_index


class _TermAction(argparse.Action):
    """--text/--image/--minus-text/--minus-image append (kind, value, sign) to one list, in command-line order, so
    that --weights can follow that order."""

    def __call__(self, parser, namespace, values, option_string=None):
        terms = list(getattr(namespace, "terms", None) or [])
        terms.append((self.const[0], values, self.const[1]))
        namespace.terms = terms


def _weights(raw: str | None, n: int) -> list[float]:
    if raw is None:
        return [1.0] * n
    try:
        weights = [float(w) for w in raw.split(",")]
    except ValueError:
        raise QueryError("--weights takes numbers separated by commas, e.g. 1,0.5") from None
    if len(weights) != n:
        raise QueryError(f"--weights gives {len(weights)} weights for {n} query terms")
    if any(w <= 0 for w in weights):
        raise QueryError("--weights must be positive (a --minus-… term's weight is negated)")
    return weights


def _checked_query(args: argparse.Namespace, config: SearchConfig) -> Query:
    """The Query for Searcher.run, checked against the limits it enforces, so that bad arguments fail before the
    model is loaded (seconds); image queries are decoded here, once."""
    check_paging(args.k, 0, config)
    given = getattr(args, "terms", None) or []
    if not given:
        raise QueryError("give a query: --text, --image (each may repeat), or both")
    terms = []
    for (kind, value, sign), weight in zip(given, _weights(args.weights, len(given))):
        if kind == "text":
            terms.append(Term(text=checked_text(value, config), weight=sign * weight))
        else:
            terms.append(Term(image=load_image(Path(value), config.max_megapixels), weight=sign * weight))
    filters = Filters(path_prefix=args.path_prefix, split=args.split, min_width=args.min_width,
                      min_height=args.min_height, taken_after=args.after and parse_date(args.after, "--after"),
                      taken_before=args.before and parse_date(args.before, "--before", end_of_day=True))
    return Query(tuple(terms), target=args.target, k=args.k, cutoff=args.cutoff, filters=filters, mode=args.mode,
                 dedupe=args.dedupe, sort=args.sort)


def _query(args: argparse.Namespace) -> int:
    config = SearchConfig()
    query = _checked_query(args, config)
    searcher = Searcher.open(args.index, args.model, args.pretrained, args.device, config,  # index checked first
                             precision=args.precision, runtime=args.runtime)
    results = searcher.run(query)
    if args.json:
        print(json.dumps(results.to_json(), ensure_ascii=False, indent=2))
        return 0
    for note in results.notes:
        print(f"note: {note}", file=sys.stderr)
    if results.message:
        print(results.message)
    for hit in results.hits:
        text = hit.caption if hit.caption is not None else (hit.captions[0] if hit.captions else "")
        where = f"  [{hit.image}]" if hit.caption is not None else f"  {hit.image}"
        score = "      -" if hit.score != hit.score else f"{hit.score:7.4f}"
        relevance = "" if hit.relevance is None else f"  {hit.relevance:4.2f}"
        print(f"{hit.rank:>4}  {score}{relevance}{where}  {text}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.format == "clip_benchmark" and (args.json or args.ties != "clip_benchmark"):
        raise QueryError("--format clip_benchmark prints CLIP_benchmark's JSON with its tie rule: drop --json/--ties")
    if args.dataset is not None and args.format != "clip_benchmark":
        raise QueryError("--dataset names the dataset in --format clip_benchmark's JSON")
    index = open_index(args.index)
    outcomes = None
    if args.per_query is not None or args.format == "clip_benchmark" or args.plots is not None:
        outcomes = per_query(index, ties=args.ties)
    if args.plots is not None:
        try:
            written = outcomes.write_plots(args.plots, "." + args.plot_format, label=Path(args.index).name)
        except OSError as exc:
            raise QueryError(f"cannot write plots into {args.plots}: {exc.strerror or exc}") from None
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    if args.per_query is not None:
        try:
            write_atomic(args.per_query, "".join(line + "\n" for line in outcomes.to_jsonl()))
        except OSError as exc:
            raise QueryError(f"cannot write {args.per_query}: {exc.strerror or exc}") from None
    if args.format == "clip_benchmark":
        print(json.dumps(clip_benchmark_result(index, outcomes, args.dataset)))
        return 0
    metrics = evaluate(index, ties=args.ties)
    print(json.dumps(metrics.to_json(), indent=2) if args.json else metrics.format())
    return 0


def _compare(args: argparse.Namespace) -> int:
    if len(args.index) != 2:
        raise QueryError(f"give --index twice (A, then B), not {len(args.index)} times")
    suffix = "." + args.plot_format
    sides = [per_query(open_index(path), ties=args.ties) for path in args.index]
    comparison = compare(*sides, n_boot=args.n_boot, seed=args.seed, labels=tuple(str(p) for p in args.index),
                         n_changes=args.top)
    print(json.dumps(comparison.to_json(), indent=2, ensure_ascii=False) if args.json else comparison.format())
    if args.plots is not None:
        try:
            written = comparison.write_plots(args.plots, suffix)
        except OSError as exc:
            raise QueryError(f"cannot write plots into {args.plots}: {exc.strerror or exc}") from None
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    entries, speeds = models(args.language), load_speeds()
    print(json.dumps(to_json(entries, speeds), indent=2, ensure_ascii=False) if args.json
          else format_table(entries, speeds))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m search", description="Search an index; measure recall@k.")
    commands = parser.add_subparsers(dest="command", required=True)

    query = commands.add_parser("query", help="text→image, image→image or image→text search")
    query.add_argument("--index", type=Path, required=True)
    what = query.add_argument_group("query terms (repeatable, combined in command-line order)")
    for flag, const, text in (("--text", ("text", 1), "a sentence to find images for"),
                              ("--image", ("image", 1), "an image file to find similar images (or captions) for"),
                              ("--minus-text", ("text", -1), "push results away from this sentence (\"without …\")"),
                              ("--minus-image", ("image", -1), "push results away from this image")):
        what.add_argument(flag, action=_TermAction, const=const, metavar=flag.split("-")[-1].upper(), help=text)
    what.add_argument("--weights", help="one positive weight per term, comma-separated, in command-line order "
                                        "(default: all 1; --minus-… terms count negatively)")
    cut = query.add_argument_group("relevance, mode and order")
    cut.add_argument("--cutoff", default="none",
                     help="auto: only hits the index's calibration calls relevant (its stored precision target); P "
                          "(0–1): hits with relevance ≥ P; none: every hit (default: none)")
    cut.add_argument("--mode", choices=MODES, default="vector",
                     help="vector (default), keyword (SQLite FTS5 over captions and file names) or hybrid (both, "
                          "fused by reciprocal rank)")
    cut.add_argument("--dedupe", action="store_true", help="collapse near-duplicates of a better hit")
    cut.add_argument("--sort", choices=SORTS, default="relevance", help="relevance (default) or date, newest first")
    where = query.add_argument_group("filters")
    where.add_argument("--path-prefix", help="only images whose path under the image folder starts with this")
    where.add_argument("--split", help="only images of this dataset split (train, val, test)")
    where.add_argument("--min-width", type=int, help="only images at least this wide (pixels)")
    where.add_argument("--min-height", type=int, help="only images at least this tall (pixels)")
    where.add_argument("--after", help="only photos taken on or after this date (2024-05-01; EXIF, else file time)")
    where.add_argument("--before", help="only photos taken on or before this date")
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
    evaluation.add_argument("--per-query", type=Path, metavar="FILE.jsonl",
                            help="also write every query's outcome (rank of the correct item, its score, what beat "
                                 "it) as JSON lines")
    evaluation.add_argument("--format", choices=("table", "clip_benchmark"), default="table",
                            help="clip_benchmark: print CLIP_benchmark's result JSON (recall as fractions; "
                                 "image_retrieval = text→image)")
    evaluation.add_argument("--dataset", help="the dataset name in --format clip_benchmark's JSON (default: the "
                                              "annotation file's name, e.g. flickr30k)")
    evaluation.add_argument("--plots", type=Path, metavar="DIR", help="also write the recall@k curves into DIR")
    evaluation.add_argument("--plot-format", choices=("png", "svg"), default="png", help="default: png")
    evaluation.set_defaults(func=_eval)

    comparing = commands.add_parser("compare", help="recall of two indexes of the same dataset, B − A with a 95%% "
                                                    "bootstrap interval, the queries that changed most")
    comparing.add_argument("--index", type=Path, action="append", required=True,
                           help="give it twice: A (the baseline), then B")
    comparing.add_argument("--json", action="store_true", help="print JSON")
    comparing.add_argument("--plots", type=Path, metavar="DIR",
                           help="write recall@k curves and rank scatter plots into DIR")
    comparing.add_argument("--plot-format", choices=("png", "svg"), default="png", help="default: png")
    comparing.add_argument("--top", type=int, default=10, help="queries listed per direction that improved / "
                                                               "worsened most (default: 10)")
    comparing.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    comparing.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    comparing.add_argument("--ties", choices=TIES, default="clip_benchmark", help="as for eval")
    comparing.set_defaults(func=_compare)

    listing = commands.add_parser("models", help="recommended models: published recall, CPU speed measured here, and "
                                                 "the --model/--pretrained to pass")
    listing.add_argument("--language", choices=LANGUAGES, help="only models that read queries in this language "
                                                               "(en: all of them; multilingual)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda args: args.func(args), make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
