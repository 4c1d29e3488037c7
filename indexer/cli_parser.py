"""The argument parser of `python -m indexer` (indexer/cli.py runs the commands)."""
from __future__ import annotations

import argparse
from pathlib import Path

from search.cli_common import CliParser, add_model_args, add_runtime_arg
from search.encoders import HF_HUB_PREFIX, LOCAL_DIR_PREFIX
from search.images import DEFAULT_MAX_MEGAPIXELS
from search.index_choice import DEFAULT_TARGET_RECALL

from .duplicates import TIERS
from .from_embeddings import FORMAT_NAME as EMBEDDINGS
from .pipeline import BuildConfig
from .ray_cluster import ENGINES
from .ray_engine import PARTITION_SAMPLES
from .readers import READERS


class _Workers(argparse.Action):
    """--workers N, remembering that it was given (its default differs by engine)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.workers, namespace.workers_given = values, True


def _alphas(text: str) -> tuple[float, ...]:
    """--interpolate 0.25,0.5: interpolation weights between 0 and 1."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None
    if not values or any(not 0 <= a <= 1 for a in values):
        raise argparse.ArgumentTypeError(f"'{text}': each weight must lie between 0 and 1")
    return values


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", default="local", choices=ENGINES,
                        help="local: this process (default); ray: decode and encode on a Ray cluster (a local one "
                             "unless --ray-address), resumable partition by partition")
    parser.add_argument("--ray-address", default=None,
                        help="--engine ray: the cluster to join, HOST:PORT or 'auto' (default: start Ray here)")
    parser.add_argument("--workers", type=int, default=BuildConfig.workers, action=_Workers,
                        help=f"local: image decoding threads (default: {BuildConfig.workers}); ray: encoding actors "
                             f"(default: one per GPU, else CPUs - 1)")
    parser.add_argument("--partition-samples", type=int, default=PARTITION_SAMPLES,
                        help=f"--engine ray: samples per partition, the unit written once and resumed from "
                             f"(default: {PARTITION_SAMPLES})")
    parser.set_defaults(workers_given=False)


def make_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m indexer", description="Build image-text search indexes.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="encode a dataset or photo folder into a new index directory")
    build.add_argument("--format", required=True, choices=sorted(READERS) + [EMBEDDINGS],
                       help="dataset format; embeddings: an embedding folder (indexer export, clip-retrieval)")
    build.add_argument("--annotations", type=Path, help="annotation file (all formats but folder)")
    build.add_argument("--images", type=Path, default=None,
                       help="root folder the annotation paths are relative to (optional for --format embeddings)")
    build.add_argument("--embeddings", type=Path, default=None, help="--format embeddings: the embedding folder")
    build.add_argument("--split", help="karpathy: train|val|test|restval; flickr8k: train|val|test (default: all)")
    build.add_argument("--out", type=Path, required=True, help="index directory to create")
    add_model_args(build)
    build.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    _add_engine_args(build)
    build.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                       help=f"skip images larger than this (default: {DEFAULT_MAX_MEGAPIXELS:g})")
    build.add_argument("--index-type", default=None,
                       help="FAISS factory string, e.g. Flat, IVF4096,Flat, IVF1024,PQ32 (default: chosen from the "
                            "collection size and --memory-budget)")
    build.add_argument("--memory-budget", default=None, help="bound on the vectors' memory, e.g. 2GB (default: none)")
    build.add_argument("--on-disk", action="store_true",
                       help="an on-disk IVF-PQ with exact re-ranking, built a chunk at a time within --memory-budget "
                            "(default 2GB) for indexes larger than memory; --format embeddings chooses it by itself "
                            "when the folder's vectors exceed --memory-budget")
    build.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL,
                       help=f"recall@10 against exact search that approximate indexes are tuned to reach "
                            f"(default: {DEFAULT_TARGET_RECALL})")
    build.add_argument("--resume", action="store_true",
                       help="continue an interrupted build (same arguments) from its last completed batch")
    build.add_argument("--fast-decode", action="store_true",
                       help="decode JPEGs at reduced scale (never below the model's input): faster, vectors slightly "
                            "off open_clip's exact preprocessing; recorded in the manifest for update")
    build.add_argument("--include-hidden", action="store_true",
                       help="folder format: also index hidden files and folders (names starting with a dot)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    build.add_argument("--quiet", action="store_true", help="no progress bar or info logs")

    refresh = commands.add_parser("update", help="rescan an index's source; encode only new and changed images")
    refresh.add_argument("--index", type=Path, required=True)
    refresh.add_argument("--images", type=Path, default=None, help="image root (default: the one recorded at build)")
    refresh.add_argument("--device", default=None)
    add_runtime_arg(refresh)
    refresh.add_argument("--batch-size", type=int, default=64)
    _add_engine_args(refresh)
    refresh.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS)
    refresh.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL)
    refresh.add_argument("--resume", action="store_true", help="continue an interrupted update")
    refresh.add_argument("--quiet", action="store_true")

    about = commands.add_parser("info", help="what an index holds")
    about.add_argument("--index", type=Path, required=True)
    about.add_argument("--json", action="store_true")
    about.add_argument("--plots", type=Path, metavar="DIR",
                       help="also write ann_recall.png: recall@10 of the approximate indexes at every build/update")
    about.add_argument("--plot-format", choices=("png", "svg"), default="png", help="default: png")

    dump = commands.add_parser("export", help="write an index's vectors as an embedding folder in the LAION / "
                                              "clip-retrieval layout (img_emb/, text_emb/, metadata/)")
    dump.add_argument("--index", type=Path, required=True)
    dump.add_argument("--out", type=Path, required=True, help="embedding folder to create")
    dump.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per .npy/.parquet file")
    dump.add_argument("--overwrite", action="store_true", help="replace an existing embedding folder at --out")

    check = commands.add_parser("verify", help="check that manifest, FAISS indexes, vectors, catalog, model and "
                                               "image files agree; exit 1 on any disagreement")
    check.add_argument("--index", type=Path, required=True)
    check.add_argument("--images", type=Path, default=None, help="image root (default: the one recorded at build)")
    check.add_argument("--sample", type=int, default=8, help="images and captions re-encoded (default: 8)")
    check.add_argument("--no-model", action="store_true", help="skip the checks that load the model")

    twins = commands.add_parser("duplicates", help="groups of images the index holds more than once")
    twins.add_argument("--index", type=Path, required=True)
    twins.add_argument("--tier", default="exact", choices=TIERS,
                       help="exact: byte-identical files, by the content hash the catalog records (default); "
                            "near: resized, recompressed, slightly cropped copies; similar: a looser tier (near and "
                            "similar: cosine thresholds calibrated on copies of the index's own photos)")
    twins.add_argument("--json", action="store_true")

    upgrade = commands.add_parser("migrate", help="upgrade an index written in an older format (2) to the current "
                                                  "one: dates, splits and the keyword index; vectors unchanged")
    upgrade.add_argument("--index", type=Path, required=True)
    upgrade.add_argument("--images", type=Path, default=None,
                         help="image root, to date the images by EXIF or file time (default: the one recorded at "
                              "build; without one the dates stay unknown)")

    tune = commands.add_parser("finetune", help="adapt the model to captioned images (contrastive training)")
    tune.add_argument("--format", required=True, choices=sorted(set(READERS) - {"folder"}), help="dataset format")
    tune.add_argument("--annotations", type=Path, required=True, help="annotation file")
    tune.add_argument("--images", type=Path, required=True, help="image root")
    tune.add_argument("--split", default=None, help="training split (default: every image)")
    tune.add_argument("--val-split", default=None, help="validation split: recall@k after every epoch, best kept")
    tune.add_argument("--out", type=Path, required=True, help="model folder to write (open_clip local-dir)")
    tune.add_argument("--model", default=None,
                      help=f"open_clip name, {LOCAL_DIR_PREFIX}PATH, {HF_HUB_PREFIX}ORG/REPO, or an open_clip model "
                           f"config .json for a custom architecture (random weights)")
    tune.add_argument("--pretrained", default=None, help="tag, checkpoint file, or 'none' for random weights")
    tune.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    tune.add_argument("--epochs", type=int, default=5)
    tune.add_argument("--batch-size", type=int, default=128, help="pairs per step (contrastive negatives)")
    tune.add_argument("--accum-steps", type=int, default=1, help="split each batch into this many micro-batches")
    tune.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-5 pretrained, 5e-4 "
                                                              "random init)")
    tune.add_argument("--weight-decay", type=float, default=0.1)
    tune.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    tune.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    tune.add_argument("--workers", type=int, default=1, help="data loading processes (default: 1)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--max-steps", type=int, default=None,
                      help="stop after this many optimisation steps in all; the learning-rate schedule ends there "
                           "(default: every step of --epochs)")
    tune.add_argument("--resume", action="store_true", help="continue the run in --out after its last epoch")
    tune.add_argument("--overwrite", action="store_true",
                      help="replace an existing model folder (kept until the new model is complete)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    guard = tune.add_argument_group("guard set", "a second, general dataset whose recall (mean of R@1/5/10 in both "
                                                 "directions) must not fall while fine-tuning")
    guard.add_argument("--guard-annotations", "--guard-dataset", type=Path, default=None, metavar="FILE",
                       help="annotation file of the guard set: its recall is measured before training and after "
                            "every epoch; an epoch that loses more than --max-regression points is never kept")
    guard.add_argument("--guard-format", default=None, choices=sorted(set(READERS) - {"folder"}),
                       help="format of the guard set (default: --format)")
    guard.add_argument("--guard-images", type=Path, default=None, metavar="DIR",
                       help="image root of the guard set (default: --images)")
    guard.add_argument("--guard-split", default=None, metavar="SPLIT",
                       help="split of the guard set (default: every image)")
    guard.add_argument("--max-regression", type=float, default=None, metavar="POINTS",
                       help="points of guard recall an epoch may lose and still be kept (default: 2)")
    guard.add_argument("--interpolate", type=_alphas, default=None, metavar="A[,A...]",
                       help="WiSE-FT: after training, measure the weights (1-A)*original + A*fine-tuned for each A "
                            "(0 and 1 always) on the validation and guard sets and keep the best safe one")

    return parser
