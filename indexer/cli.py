"""`python -m indexer build|finetune ...`: build an index from a dataset; fine-tune the model on captioned pairs."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from search.atomic import swap_into_place
from search.cli_common import CliParser, add_model_args, add_runtime_arg, run_cli
from search.encoders import DEFAULT_MODEL, HF_HUB_PREFIX, LOCAL_DIR_PREFIX, EncoderSpec, create_encoder
from search.errors import DatasetError
from search.images import DEFAULT_MAX_MEGAPIXELS
from search.index_choice import DEFAULT_TARGET_RECALL, IndexOptions, parse_size
from search.recall import RetrievalRecall
from search.store import open_index

# search.openclip and .finetune import torch (seconds): imported where used, so that --help and bad
# arguments answer at once
from .verify import format_info, info, verify

from .loader import Reuse
from .pipeline import BuildConfig, build_index
from .readers import READERS, dataset_source, read_dataset
from .writer import check_output_dir, resume_progress
from .from_embeddings import FORMAT_NAME as EMBEDDINGS, build_from_embeddings, describe
from .ondisk_build import OnDiskOptions, build_on_disk, should_build_on_disk
from .ondisk_index_build import DEFAULT_MEMORY_BUDGET
from .lock import WriterLock
from .ray_cluster import ENGINES
from .ray_engine import PARTITION_SAMPLES
from .model_folder import training_folder


def _one_writer(target: str, lock_if=lambda path: True):
    """Run the command holding the writer lock on `args.<target>`, taken before any check, dataset read or model
    load: a second writer is refused at once by name, not by a side effect of the first ("already exists", "nothing
    to resume"). The IndexWriter inside takes the same lock again (re-entrant in one thread). `lock_if(path)` false:
    no early lock, so bad input leaves no folder or lock file behind (only where the IndexWriter's own lock, taken
    before it creates anything, is enough)."""
    def wrap(command):
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            path = Path(getattr(args, target))
            if not lock_if(path):
                return command(args)
            with WriterLock(path):
                return command(args)
        return run
    return wrap


@_one_writer("out", lock_if=lambda out: out.parent.is_dir())  # else no other writer can be at work yet
def _build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_output_dir(out, args.overwrite)  # fail before loading a model or reading a dataset
    if args.format == EMBEDDINGS:
        return _build_from_embeddings(args)
    if args.images is None:
        raise DatasetError(f"--images is required for --format {args.format} (the image root)")
    if args.resume:
        resume_progress(out)  # EngineError when there is nothing to resume
    samples = read_dataset(args.format, args.annotations, args.images, args.split, args.include_hidden)
    encoder = create_encoder(EncoderSpec.from_args(args.model, args.pretrained), args.runtime, device=args.device,
                             batch_size=args.batch_size, precision=args.precision)
    index = IndexOptions(args.index_type, parse_size(args.memory_budget), args.target_recall)
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers, max_megapixels=args.max_megapixels,
                         index=index, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
                         fast_decode=args.fast_decode)
    source = dataset_source(args.format, args.annotations, args.images, args.split,
                            include_hidden=args.include_hidden)
    print(_run_build(args, samples, args.images, encoder, out, config, source).summary())
    return 0


def _run_build(args: argparse.Namespace, samples, images: Path, encoder, out: Path, config: BuildConfig,
               source: dict, reuse: Reuse | None = None):
    """The build or update on the engine --engine names."""
    if args.engine == "local":
        return build_index(samples, images, encoder, out, config, source, reuse)
    from .ray_build import build_index_on_ray  # Ray is imported by --engine ray only
    from .ray_engine import RayOptions

    options = RayOptions(args.ray_address, args.workers if args.workers_given else None, args.partition_samples,
                         args.runtime, args.device)
    return build_index_on_ray(samples, images, encoder, out, config, options, source, reuse)


def _build_from_embeddings(args: argparse.Namespace) -> int:
    if args.embeddings is None:
        raise DatasetError("--format embeddings needs --embeddings DIR (an embedding folder)")
    described = describe(args.embeddings)
    if args.model is None and described is None:
        raise DatasetError(f"{args.embeddings} does not name its model (no embeddings.json): pass the --model (and "
                           f"--pretrained) that made it, e.g. the one given to clip-retrieval inference")
    spec = (EncoderSpec.from_dict(described["encoder"]) if args.model is None
            else EncoderSpec.from_args(args.model, args.pretrained))
    encoder = create_encoder(spec, args.runtime, device=args.device, precision=args.precision)
    budget = parse_size(args.memory_budget)
    on_disk = args.on_disk or should_build_on_disk(args.embeddings, budget)
    if on_disk:
        if args.resume:
            raise DatasetError("an on-disk build cannot --resume: run it again without --resume")
        if not args.on_disk:
            logging.getLogger(__name__).info("the vectors of %s exceed --memory-budget %s as float32: building an "
                                             "on-disk index", args.embeddings, args.memory_budget)
        options = OnDiskOptions(args.index_type, budget or DEFAULT_MEMORY_BUDGET, args.target_recall,
                                engine=getattr(args, "engine", "local"), ray_address=getattr(args, "ray_address", None),
                                progress=not args.quiet)
        manifest = build_on_disk(args.embeddings, args.out, encoder, args.images, options, args.overwrite)
    else:
        index = IndexOptions(args.index_type, budget, args.target_recall)
        manifest = build_from_embeddings(args.embeddings, args.out, encoder, args.images, index, args.overwrite)
    print(f"indexed {manifest.n_images:,} images and {manifest.n_captions:,} captions from {args.embeddings} into "
          f"{args.out} (no encoding; queries use {manifest.encoder}{'; on disk' if on_disk else ''})")
    return 0


@_one_writer("index", lock_if=Path.exists)  # a missing index: open_index says so
def _update(args: argparse.Namespace) -> int:
    previous = open_index(args.index)
    manifest = previous.manifest
    source = dict(manifest.source)
    if source.get("format") == EMBEDDINGS:
        raise DatasetError(f"{args.index} was built from the embedding folder {source.get('embeddings')}: build it "
                           f"again from that folder (python -m indexer build --format embeddings ... --overwrite)")
    images = Path(args.images or source.get("images") or ".")
    samples = read_dataset(source["format"], source.get("annotations"), images, source.get("split"),
                           source.get("include_hidden", False))
    encoder = create_encoder(manifest.encoder, args.runtime, device=args.device, batch_size=args.batch_size,
                             precision=manifest.precision)
    previous.check_encoder(encoder)
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers, max_megapixels=args.max_megapixels,
                         index=IndexOptions(target_recall=args.target_recall), overwrite=True,
                         resume=args.resume, progress=not args.quiet, fast_decode=manifest.fast_decode)
    report = _run_build(args, samples, images, encoder, args.index, config,
                        {**source, "images": str(images.resolve())}, Reuse(previous))
    print(report.summary())
    return 0


@_one_writer("out")
def _finetune(args: argparse.Namespace) -> int:
    out = Path(args.out)
    work = training_folder(out, args.resume, args.overwrite)  # --out and the dataset are checked before torch loads
    train = read_dataset(args.format, args.annotations, args.images, args.split)
    val = read_dataset(args.format, args.annotations, args.images, args.val_split) if args.val_split else None
    from .finetune import FinetuneConfig, Trainer, load_for_training

    task, from_random = load_for_training(args.model or DEFAULT_MODEL, args.pretrained, work, args.device, args.seed)
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
                            weight_decay=args.weight_decay, lock_image=args.lock_image, lock_text=args.lock_text,
                            workers=args.workers, seed=args.seed, max_steps=args.max_steps,
                            progress=not args.quiet)
    source = dataset_source(args.format, args.annotations, args.images, args.split, val_split=args.val_split)
    trainer = Trainer(task, train, val, args.images, work, config, source, from_random)
    if args.resume:
        trainer.resume()
    run = trainer.fit()
    if work != out:
        swap_into_place(work, out)  # the old model stayed in place until now
    best = next((r for r in run["history"] if r["epoch"] == run["best_epoch"]), None)
    summary = f"model saved to {out} (best epoch {run['best_epoch']} of {len(run['history'])})"
    if best and "val" in best:
        summary += f"; val {RetrievalRecall.from_json(best['val']).format(ks=(5,))}"
    print(summary + f"\nuse it with: --model {LOCAL_DIR_PREFIX}{out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    details = info(args.index)
    print(json.dumps(details, indent=2, ensure_ascii=False) if args.json else format_info(details))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .embedding_folder import export_embeddings  # pyarrow: imported by this command only

    folder = export_embeddings(args.index, args.out, args.rows_per_file, args.overwrite)
    kinds = "image and caption" if folder.with_text else "image"
    print(f"wrote {folder.rows:,} rows of {folder.dim}-d {kinds} vectors in {folder.files} file(s) to {folder.path} "
          f"(LAION layout: embedding-reader and autofaiss read it)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.index, args.images, args.sample, use_model=not args.no_model)
    print("\n".join(report.checks))
    if report.failures:
        print(f"error: {report.failures} check(s) failed for {args.index}", file=sys.stderr)
        return 1
    print(f"{args.index}: all {len(report.checks)} checks passed")
    return 0


class _Workers(argparse.Action):
    """--workers N, remembering that it was given (its default differs by engine)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.workers, namespace.workers_given = values, True


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
                       help="--format embeddings: stream the folder into an on-disk IVF-PQ with exact re-ranking, "
                            "every step within --memory-budget (default 2GB); chosen automatically when the vectors "
                            "exceed --memory-budget")
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
    build.set_defaults(func=_build)

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
    refresh.set_defaults(func=_update)

    about = commands.add_parser("info", help="what an index holds")
    about.add_argument("--index", type=Path, required=True)
    about.add_argument("--json", action="store_true")
    about.set_defaults(func=_info)

    dump = commands.add_parser("export", help="write an index's vectors as an embedding folder in the LAION / "
                                              "clip-retrieval layout (img_emb/, text_emb/, metadata/)")
    dump.add_argument("--index", type=Path, required=True)
    dump.add_argument("--out", type=Path, required=True, help="embedding folder to create")
    dump.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per .npy/.parquet file")
    dump.add_argument("--overwrite", action="store_true", help="replace an existing embedding folder at --out")
    dump.set_defaults(func=_export)

    check = commands.add_parser("verify", help="check that manifest, FAISS indexes, vectors, catalog, model and "
                                               "image files agree; exit 1 on any disagreement")
    check.add_argument("--index", type=Path, required=True)
    check.add_argument("--images", type=Path, default=None, help="image root (default: the one recorded at build)")
    check.add_argument("--sample", type=int, default=8, help="images and captions re-encoded (default: 8)")
    check.add_argument("--no-model", action="store_true", help="skip the checks that load the model")
    check.set_defaults(func=_verify)

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
    tune.set_defaults(func=_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda args: args.func(args), make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
