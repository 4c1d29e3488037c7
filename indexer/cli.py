"""`python -m indexer build|finetune ...`: build an index from a dataset; fine-tune the model on captioned pairs."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

from search.cli_common import add_model_args, run_cli
from search.encoders import DEFAULT_MODEL, EncoderSpec, create_encoder
from search.errors import IndexExistsError
from search.images import DEFAULT_MAX_MEGAPIXELS
from search.index_choice import DEFAULT_TARGET_RECALL, IndexOptions, parse_size
from search.openclip_encoder import init_local_dir
from search.store import open_index

from .finetune import STATE_DIR, FinetuneConfig, Trainer
from .verify import info, verify

from .pipeline import BuildConfig, Reuse, build_index
from .readers import READERS, dataset_source, read_dataset
from .writer import check_output_dir, partial_dir


def _build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_output_dir(out, args.overwrite)  # fail before loading a model or reading a dataset
    if args.resume and not (partial_dir(out) / "progress.json").is_file():
        raise IndexExistsError(f"nothing to resume for {out}: no interrupted build in {partial_dir(out)}")
    samples = read_dataset(args.format, args.annotations, args.images, args.split, args.include_hidden)
    encoder = create_encoder(EncoderSpec.from_args(args.model, args.pretrained), device=args.device,
                             batch_size=args.batch_size, precision=args.precision)
    index = IndexOptions(args.index_type, parse_size(args.memory_budget), args.target_recall)
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers, max_megapixels=args.max_megapixels,
                         index=index, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    source = dataset_source(args.format, args.annotations, args.images, args.split,
                            include_hidden=args.include_hidden)
    report = build_index(samples, args.images, encoder, out, config, source)
    print(report.summary())
    return 0


def _update(args: argparse.Namespace) -> int:
    previous = open_index(args.index)
    manifest = previous.manifest
    source = dict(manifest.source)
    images = Path(args.images or source.get("images") or ".")
    samples = read_dataset(source["format"], source.get("annotations"), images, source.get("split"),
                           source.get("include_hidden", False))
    encoder = create_encoder(manifest.encoder, device=args.device, batch_size=args.batch_size,
                             precision=manifest.precision)
    previous.check_encoder(encoder)
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers, max_megapixels=args.max_megapixels,
                         index=IndexOptions(target_recall=args.target_recall), overwrite=True,
                         resume=args.resume, progress=not args.quiet)
    report = build_index(samples, images, encoder, args.index, config, {**source, "images": str(images.resolve())},
                         Reuse(previous))
    print(report.summary())
    return 0


def _check_model_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume or not out.exists() or not any(out.iterdir()):
        return
    is_model = (out / "open_clip_config.json").is_file() or (out / STATE_DIR).is_dir()
    if not overwrite:
        raise IndexExistsError(f"{out} already exists; pass --resume to continue its run or --overwrite to replace it")
    if not is_model:
        raise IndexExistsError(f"{out} is a non-empty directory that is not a model folder; refusing to replace it")
    shutil.rmtree(out)


def load_for_training(model: str, pretrained: str | None, out: Path, device: str | None, seed: int):
    """The encoder to start from and whether its weights are random. `model` may be an open_clip model config JSON
    file: a custom architecture, randomly initialised (kept in the run's state folder so --resume finds it)."""
    if model.endswith(".json") and Path(model).is_file():
        config = json.loads(Path(model).read_text(encoding="utf-8"))
        folder = out / STATE_DIR / "init"
        if not (folder / "open_clip_config.json").is_file():
            init_local_dir(config.get("model_cfg", config), folder, seed)
        model, pretrained = f"local-dir:{folder}", None
        return create_encoder(EncoderSpec.from_args(model, pretrained), device=device), True
    spec = EncoderSpec.from_args(model, pretrained)
    return create_encoder(spec, device=device), spec.pretrained == "none"


def _finetune(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_model_out(out, args.resume, args.overwrite)
    train = read_dataset(args.format, args.annotations, args.images, args.split)
    val = read_dataset(args.format, args.annotations, args.images, args.val_split) if args.val_split else None
    encoder, from_random = load_for_training(args.model or DEFAULT_MODEL, args.pretrained, out, args.device, args.seed)
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
                            weight_decay=args.weight_decay, lock_image=args.lock_image, lock_text=args.lock_text,
                            workers=args.workers, seed=args.seed, max_minutes=args.max_minutes,
                            progress=not args.quiet)
    source = dataset_source(args.format, args.annotations, args.images, args.split, val_split=args.val_split)
    trainer = Trainer(encoder, train, val, args.images, out, config, source, from_random)
    if args.resume:
        trainer.resume()
    run = trainer.fit()
    best = next((r for r in run["history"] if r["epoch"] == run["best_epoch"]), None)
    summary = f"model saved to {out} (best epoch {run['best_epoch']} of {len(run['history'])})"
    if best and "val" in best:
        summary += f"; val text→image R@5 {best['val']['text_to_image']['R@5']:.1f}, image→text R@5 " \
                   f"{best['val']['image_to_text']['R@5']:.1f}"
    print(summary + f"\nuse it with: --model local-dir:{out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    details = info(args.index)
    if args.json:
        print(json.dumps(details, indent=2, ensure_ascii=False))
        return 0
    for key, value in details.items():
        if key == "indexes":
            for kind, entry in value.items():
                extra = ", ".join(f"{k} {v}" for k, v in entry.items() if k != "factory" and v not in (None, {}))
                print(f"{kind + ' index':>16}: {entry.get('factory')}{' (' + extra + ')' if extra else ''}")
        else:
            print(f"{key:>16}: {value}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.index, args.images, args.sample, use_model=not args.no_model)
    print("\n".join(report.checks))
    if report.failures:
        print(f"error: {report.failures} check(s) failed for {args.index}", file=sys.stderr)
        return 1
    print(f"{args.index}: all {len(report.checks)} checks passed")
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
    build.add_argument("--index-type", default=None,
                       help="FAISS factory string, e.g. Flat, IVF4096,Flat, IVF1024,PQ32 (default: chosen from the "
                            "collection size and --memory-budget)")
    build.add_argument("--memory-budget", default=None, help="bound on the vectors' memory, e.g. 2GB (default: none)")
    build.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL,
                       help=f"recall@10 against exact search that approximate indexes are tuned to reach "
                            f"(default: {DEFAULT_TARGET_RECALL})")
    build.add_argument("--resume", action="store_true",
                       help="continue an interrupted build (same arguments) from its last completed batch")
    build.add_argument("--include-hidden", action="store_true",
                       help="folder format: also index hidden files and folders (names starting with a dot)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    build.add_argument("--quiet", action="store_true", help="no progress bar or info logs")
    build.set_defaults(func=_build)

    refresh = commands.add_parser("update", help="rescan an index's source; encode only new and changed images")
    refresh.add_argument("--index", type=Path, required=True)
    refresh.add_argument("--images", type=Path, default=None, help="image root (default: the one recorded at build)")
    refresh.add_argument("--device", default=None)
    refresh.add_argument("--batch-size", type=int, default=64)
    refresh.add_argument("--workers", type=int, default=BuildConfig.workers)
    refresh.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS)
    refresh.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL)
    refresh.add_argument("--resume", action="store_true", help="continue an interrupted update")
    refresh.add_argument("--quiet", action="store_true")
    refresh.set_defaults(func=_update)

    about = commands.add_parser("info", help="what an index holds")
    about.add_argument("--index", type=Path, required=True)
    about.add_argument("--json", action="store_true")
    about.set_defaults(func=_info)

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
    tune.add_argument("--model", default=None, help="open_clip name, local-dir:PATH, hf-hub:ORG/REPO, or an open_clip "
                                                    "model config .json for a custom architecture (random weights)")
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
    tune.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    tune.add_argument("--resume", action="store_true", help="continue the run in --out after its last epoch")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(func=_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda args: args.func(args), make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
