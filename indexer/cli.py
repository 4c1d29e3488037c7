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
from search.cli_common import run_cli
from search.encoders import DEFAULT_MODEL, LOCAL_DIR_PREFIX, EncoderSpec, create_encoder
from search.errors import DatasetError, EngineError
from search.index_choice import IndexOptions, parse_size
from search.manifest import read_manifest
from search.recall import RetrievalRecall

# search.openclip and .finetune import torch (seconds): imported where used, so that --help and bad
# arguments answer at once
from .verify import format_info, info, verify

from .loader import Reuse
from .pipeline import BuildConfig, build_index
from .readers import dataset_source, read_dataset
from .writer import check_output_dir, resume_progress
from .from_embeddings import FORMAT_NAME as EMBEDDINGS, build_from_embeddings, describe
from .ondisk_build import OnDiskOptions, build_on_disk, should_build_on_disk
from .ondisk_index_build import DEFAULT_MEMORY_BUDGET
from .lock import WriterLock
from .cli_parser import make_parser
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
                         fast_decode=args.fast_decode,
                         on_disk=_on_disk_options(args, args.index_type, index.memory_budget) if args.on_disk else None)
    source = dataset_source(args.format, args.annotations, args.images, args.split,
                            include_hidden=args.include_hidden)
    print(_run_build(args, samples, args.images, encoder, out, config, source).summary())
    return 0


def _on_disk_options(args: argparse.Namespace, factory: str | None, budget: int | None) -> OnDiskOptions:
    return OnDiskOptions(factory, budget or DEFAULT_MEMORY_BUDGET, args.target_recall, engine=args.engine,
                         ray_address=args.ray_address, progress=not args.quiet)


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
        manifest = build_on_disk(args.embeddings, args.out, encoder, args.images,
                                 _on_disk_options(args, args.index_type, budget), args.overwrite)
    else:
        index = IndexOptions(args.index_type, budget, args.target_recall)
        manifest = build_from_embeddings(args.embeddings, args.out, encoder, args.images, index, args.overwrite)
    print(f"indexed {manifest.n_images:,} images and {manifest.n_captions:,} captions from {args.embeddings} into "
          f"{args.out} (no encoding; queries use {manifest.encoder}{'; on disk' if on_disk else ''})")
    return 0


@_one_writer("index", lock_if=Path.exists)  # a missing index: open_index says so
def _update(args: argparse.Namespace) -> int:
    from .library import plan_update

    plan = plan_update(args.index, args.images)
    manifest = plan.previous.manifest
    encoder = create_encoder(manifest.encoder, args.runtime, device=args.device, batch_size=args.batch_size,
                             precision=manifest.precision)
    plan.previous.check_encoder(encoder)
    on_disk = manifest.indexes.get("images", {}).get("on_disk")  # built on disk: updated on disk
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers, max_megapixels=args.max_megapixels,
                         index=IndexOptions(target_recall=args.target_recall), overwrite=True,
                         resume=args.resume, progress=not args.quiet, fast_decode=manifest.fast_decode,
                         on_disk=_on_disk_options(args, None, None) if on_disk else None)
    report = _run_build(args, plan.samples, plan.images, encoder, args.index, config, plan.source, plan.reuse)
    print(report.summary())
    return 0


@_one_writer("out")
def _finetune(args: argparse.Namespace) -> int:
    out = Path(args.out)
    work = training_folder(out, args.resume, args.overwrite)  # --out and the dataset are checked before torch loads
    train = read_dataset(args.format, args.annotations, args.images, args.split)
    val = read_dataset(args.format, args.annotations, args.images, args.val_split) if args.val_split else None
    guarding = _guard_settings(args)  # the guard set is read before torch loads too
    from .finetune import FinetuneConfig, Trainer, load_for_training
    from .guard import Guard, GuardConfig, format_interpolation, write_epoch_plot

    task, from_random = load_for_training(args.model or DEFAULT_MODEL, args.pretrained, work, args.device, args.seed)
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
                            weight_decay=args.weight_decay, lock_image=args.lock_image, lock_text=args.lock_text,
                            workers=args.workers, seed=args.seed, max_steps=args.max_steps,
                            progress=not args.quiet)
    source = dataset_source(args.format, args.annotations, args.images, args.split, val_split=args.val_split)
    guard = Guard(GuardConfig(**guarding), task) if guarding else None  # before resume: keeps the original weights
    trainer = Trainer(task, train, val, args.images, work, config, source, from_random, guard=guard)
    if args.resume:
        trainer.resume()
    run = trainer.fit()
    plot = write_epoch_plot(work, run)
    outcome = run.get("outcome") or {}
    if outcome.get("refused"):  # one line, exit 1; an --overwrite run is not swapped in
        raise EngineError(outcome["message"] + (f" (in {out})" if work == out else
                                                f"; {out} keeps its previous model (this run: {work})"))
    if work != out:
        swap_into_place(work, out)  # the old model stayed in place until now
    best = next((r for r in run["history"] if r["epoch"] == run["best_epoch"]), None)
    summary = f"model saved to {out}" + ("" if run["best_epoch"] is None else  # None: an α the guard let through
                                         f" (best epoch {run['best_epoch']} of {len(run['history'])})")
    if best and "val" in best:
        summary += f"; val {RetrievalRecall.from_json(best['val']).format(ks=(5,))}"
    for line in format_interpolation(run) + ([outcome["message"]] if outcome.get("message") else []):
        summary += f"\n{line}"
    if plot is not None:
        summary += f"\nrecall per epoch: {out / plot.name}"
    print(summary + f"\nuse it with: --model {LOCAL_DIR_PREFIX}{out}")
    return 0


def _guard_settings(args: argparse.Namespace) -> dict | None:
    """GuardConfig's arguments from --guard-* / --max-regression / --interpolate (None: neither asked for), the guard
    set read; DatasetError for flags that need a guard set or a validation split without one."""
    if args.guard_annotations is None:
        given = [flag for flag, value in (("--guard-format", args.guard_format), ("--guard-images", args.guard_images),
                                          ("--guard-split", args.guard_split),
                                          ("--max-regression", args.max_regression)) if value is not None]
        if given:
            raise DatasetError(f"{given[0]} needs a guard set: pass --guard-annotations FILE")
        if args.interpolate is None:
            return None
        if args.val_split is None:
            raise DatasetError("--interpolate needs --val-split or a guard set (--guard-annotations) to choose α")
        return {"alphas": args.interpolate}
    fmt, images = args.guard_format or args.format, args.guard_images or args.images
    settings = {"samples": tuple(read_dataset(fmt, args.guard_annotations, images, args.guard_split)),
                "images_root": images, "source": dataset_source(fmt, args.guard_annotations, images, args.guard_split),
                "alphas": args.interpolate or ()}
    return settings if args.max_regression is None else {**settings, "max_regression": args.max_regression}


def _info(args: argparse.Namespace) -> int:
    details = info(args.index)
    print(json.dumps(details, indent=2, ensure_ascii=False) if args.json else format_info(details))
    if args.plots is not None:
        from search import plots  # matplotlib: imported by this option only

        figure = plots.ann_recall_of(read_manifest(args.index).indexes)
        if figure is None:
            print("no plot: every index of this one searches exactly (Flat)", file=sys.stderr)
            return 0
        try:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
            path = plots.save(figure, Path(args.plots) / f"ann_recall.{args.plot_format}")
        except OSError as exc:
            raise EngineError(f"cannot write into {args.plots}: {exc.strerror or exc}") from None
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .embedding_folder import export_embeddings  # pyarrow: imported by this command only

    folder = export_embeddings(args.index, args.out, args.rows_per_file, args.overwrite)
    kinds = "image and caption" if folder.with_text else "image"
    print(f"wrote {folder.rows:,} rows of {folder.dim}-d {kinds} vectors in {folder.files} file(s) to {folder.path} "
          f"(LAION layout: embedding-reader and autofaiss read it)")
    return 0


def _duplicates(args: argparse.Namespace) -> int:
    from .duplicates import find_duplicates

    report = find_duplicates(args.index, args.tier)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
        return 0
    if report.threshold is None:
        for group in report.groups:
            print(f"{len(group.ids)} identical files ({group.size:,} bytes each): " + ", ".join(group.paths))
        print(f"{args.index}: {len(report.groups)} group(s) of identical files among {report.n_images:,} images; "
              f"{report.redundant} redundant file(s), {report.redundant_bytes:,} bytes")
        return 0
    for group in report.groups:
        print(f"{len(group.ids)} {args.tier}-duplicates: " + ", ".join(
            f"{path} ({score:.3f})" for path, score in zip(group.paths, group.scores)))
    print(report.threshold.describe())
    print(f"{args.index}: {len(report.groups)} group(s) of {args.tier}-duplicates among {report.n_images:,} images; "
          f"{report.redundant} redundant file(s), {report.redundant_bytes:,} bytes")
    return 0


@_one_writer("index", lock_if=Path.exists)  # a missing index: migrate_index says so
def _migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate_index

    print(migrate_index(args.index, args.images).summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.index, args.images, args.sample, use_model=not args.no_model)
    print("\n".join(report.checks))
    if report.failures:
        print(f"error: {report.failures} check(s) failed for {args.index}", file=sys.stderr)
        return 1
    print(f"{args.index}: all {len(report.checks)} checks passed")
    return 0


HANDLERS = {"build": _build, "update": _update, "info": _info, "export": _export, "verify": _verify,
            "duplicates": _duplicates, "finetune": _finetune, "migrate": _migrate}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda args: HANDLERS[args.command](args), make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
