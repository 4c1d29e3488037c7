"""Building and updating indexes from Python: what `python -m indexer build|update` do on the local engine, as
functions that return a `BuildReport` and raise the project's typed errors (search/errors.py).

    from indexer import build, update
    report = build("folder", images="photos", out="indexes/photos", model="ViT-B-32")
    report = update("indexes/photos")           # after photos were added, changed or removed
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from search.encoders import EncoderSpec, create_encoder
from search.errors import DatasetError
from search.store import StoredIndex, open_index

from .from_embeddings import FORMAT_NAME as EMBEDDINGS
from .loader import Reuse
from .pipeline import BuildConfig, BuildReport, build_index
from .readers import Sample, dataset_source, read_dataset
from .writer import check_output_dir

QUIET = BuildConfig(progress=False)  # library calls draw no progress bar unless asked


def build(format: str, images: Path | str, out: Path | str, *, annotations: Path | str | None = None,
          split: str | None = None, model: str | None = None, pretrained: str | None = None,
          runtime: str = "auto", device: str | None = None, precision: str = "fp32",
          config: BuildConfig = QUIET) -> BuildReport:
    """Index the dataset `format` (search's readers: karpathy, flickr8k, coco, folder, csv) with `model` (default
    ViT-B-32) into `out`, atomically. IndexExistsError when `out` exists and `config.overwrite` is not set."""
    out = Path(out)
    check_output_dir(out, config.overwrite)  # before a model is loaded or a dataset read
    samples = read_dataset(format, _path(annotations), Path(images), split)
    encoder = create_encoder(EncoderSpec.from_args(model, pretrained), runtime, device=device,
                             batch_size=config.batch_size, precision=precision)
    source = dataset_source(format, _path(annotations), Path(images), split)
    return build_index(samples, Path(images), encoder, out, config, source)


@dataclass(frozen=True)
class UpdatePlan:
    """What an update of an index reads: its previous version, the dataset as it is now and how vectors are reused."""

    previous: StoredIndex
    samples: list[Sample]
    images: Path
    source: dict
    reuse: Reuse


def plan_update(index: Path | str, images: Path | str | None = None) -> UpdatePlan:
    """Read the source the manifest records (or the image folder `images`) again. DatasetError for indexes built from
    an embedding folder (build those again from the folder)."""
    previous = open_index(index)
    source = dict(previous.manifest.source)
    if source.get("format") == EMBEDDINGS:
        raise DatasetError(f"{index} was built from the embedding folder {source.get('embeddings')}: build it "
                           f"again from that folder (python -m indexer build --format embeddings ... --overwrite)")
    root = Path(images or source.get("images") or ".")
    samples = read_dataset(source["format"], source.get("annotations"), root, source.get("split"),
                           source.get("include_hidden", False))
    return UpdatePlan(previous, samples, root, {**source, "images": str(root.resolve())}, Reuse(previous, root))


def update(index: Path | str, *, images: Path | str | None = None, runtime: str = "auto", device: str | None = None,
           config: BuildConfig = QUIET) -> BuildReport:
    """Bring `index` up to date with its source: only new or changed images are encoded (see README, "Update an
    index"); the result equals a fresh build of the same files and is swapped in atomically."""
    plan = plan_update(index, images)
    manifest = plan.previous.manifest
    encoder = create_encoder(manifest.encoder, runtime, device=device, batch_size=config.batch_size,
                             precision=manifest.precision)
    plan.previous.check_encoder(encoder)
    config = replace(config, overwrite=True, fast_decode=manifest.fast_decode)
    return build_index(plan.samples, plan.images, encoder, Path(index), config, plan.source, plan.reuse)


def _path(value: Path | str | None) -> Path | None:
    return None if value is None else Path(value)
