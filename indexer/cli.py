"""`python -m indexer build ...`: read a dataset, encode it, write an index directory."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from search.cli_common import add_model_args, run_cli
from search.encoders import EncoderSpec, create_encoder
from search.images import DEFAULT_MAX_MEGAPIXELS

from .pipeline import BuildConfig, build_index
from .readers import READERS, read_dataset
from .writer import check_output_dir


def _build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_output_dir(out, args.overwrite)  # fail before loading a model or reading a dataset
    samples = read_dataset(args.format, args.annotations, args.images, args.split)
    encoder = create_encoder(EncoderSpec.from_args(args.model, args.pretrained), device=args.device,
                             batch_size=args.batch_size)
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers, max_megapixels=args.max_megapixels,
                         overwrite=args.overwrite, progress=not args.quiet)
    source = {"format": args.format, "annotations": str(Path(args.annotations).resolve()) if args.annotations else None,
              "images": str(Path(args.images).resolve()), "split": args.split}
    report = build_index(samples, args.images, encoder, out, config, source)
    print(report.summary())
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m indexer", description="Build image-text search indexes.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="encode a dataset or photo folder into a new index directory")
    build.add_argument("--format", required=True, choices=sorted(READERS), help="dataset format")
    build.add_argument("--annotations", type=Path, help="annotation file (all formats but folder)")
    build.add_argument("--images", type=Path, required=True, help="root folder the annotation paths are relative to")
    build.add_argument("--split", help="karpathy: train|val|test|restval; flickr8k: train|val|test (default: all)")
    build.add_argument("--out", type=Path, required=True, help="index directory to create")
    add_model_args(build)
    build.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    build.add_argument("--workers", type=int, default=BuildConfig.workers,
                       help=f"image decoding threads (default: {BuildConfig.workers})")
    build.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                       help=f"skip images larger than this (default: {DEFAULT_MAX_MEGAPIXELS:g})")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    build.add_argument("--quiet", action="store_true", help="no progress bar or info logs")
    build.set_defaults(func=_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda args: args.func(args), make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
