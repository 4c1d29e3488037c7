"""`build_index_on_ray`: a build or update whose encoding runs on Ray (indexer/ray_engine.py) and whose result is the
index a local build (indexer/pipeline.py) makes of the same samples: same catalog and ids, vectors equal to ~1e-6."""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from search.encoders import Encoder
from search.errors import DatasetError
from search.layout import RAY_PARTS_DIR

from .loader import Reuse, StageClock
from .pipeline import BuildConfig, BuildReport, Changes, build_job, build_manifest, write
from .ray_cluster import ray_session
from .ray_engine import RayOptions, dataset_rows, encode_partitions, part_file, read_part
from .readers import Sample
from .near_duplicates import calibrate_build
from .writer import IndexWriter

log = logging.getLogger(__name__)


def build_index_on_ray(samples: Sequence[Sample], images_root: Path, encoder: Encoder, out: Path,
                       config: BuildConfig = BuildConfig(), options: RayOptions = RayOptions(),
                       source: dict | None = None, reuse: Reuse | None = None) -> BuildReport:
    """Encode the samples on Ray, partition by partition, then write the index at `out` atomically. With
    `config.resume`, partitions an interrupted run finished (written or on disk) are not computed again."""
    started, clock, changes = time.perf_counter(), StageClock(), Changes(reuse)
    size = options.partition_samples
    job = {**build_job(encoder, config, len(samples), source, reuse is not None), "engine": "ray",
           "partition_samples": size}
    n_parts = math.ceil(len(samples) / size)
    redirect = logging_redirect_tqdm() if config.progress else contextlib.nullcontext()
    with redirect, IndexWriter(out, config.overwrite, encoder.dim, job, config.resume) as writer:
        skipped = list(writer.skipped)
        writer.checkpoint(writer.samples_done, skipped)  # a record from the start: a killed driver can --resume
        first = writer.samples_done // size
        todo = [n for n in range(first, n_parts) if not part_file(writer.tmp, n).is_file()]
        if config.resume:
            log.info("resuming: %d of %d partitions finished", n_parts - len(todo), n_parts)
        rows = dataset_rows(samples, todo, size, Path(images_root), reuse)
        with clock("encode"), tqdm(total=len(samples), initial=len(samples) - len(rows), unit="img",
                                   desc="encoding on ray", disable=not config.progress) as bar:
            if rows:
                with ray_session(options.address) as resources:
                    for n in encode_partitions(rows, writer.tmp, size, encoder, Path(images_root),
                                               config.max_megapixels,
                                               encoder.image_size if config.fast_decode else None, options,
                                               config.batch_size, resources):
                        bar.update(n)
        with clock("write"):
            for number in range(first, n_parts):
                items, image_vectors, fresh, part_skipped = read_part(part_file(writer.tmp, number), samples, reuse)
                for record in part_skipped:
                    log.warning("skipped %s", record["reason"])
                texts = [caption for item in items for caption in item.sample.captions]

                def lookup(wanted, fresh=fresh):
                    return np.stack([fresh[t] for t in wanted]) if wanted else np.zeros((0, encoder.dim), np.float32)

                write(writer, items, image_vectors, reuse.caption_vectors(texts, lookup) if reuse else lookup(texts))
                skipped += part_skipped
                writer.checkpoint(min(len(samples), (number + 1) * size), skipped)
                changes.count(items)
                part_file(writer.tmp, number).unlink()  # its rows are durable in the writer's files now
        if writer.n_images == 0:
            reason = skipped[0]["reason"] if skipped else "no samples"
            raise DatasetError(f"none of the {len(samples)} images could be read (first: {reason})")
        shutil.rmtree(writer.tmp / RAY_PARTS_DIR, ignore_errors=True)  # not part of the index swapped into place
        with clock("encode"):  # the near-duplicate tiers, on copies of ~32 of the images: from the raw vectors
            near = calibrate_build(writer, Path(images_root), encoder, config.max_megapixels)
        with clock("index"):
            manifest = writer.commit(replace(build_manifest(encoder, writer, config, source, skipped),
                                             near_duplicates=near), config.index, config.on_disk)
    stages = {stage: seconds for stage, seconds in clock.seconds.items() if stage in ("encode", "write", "index")}
    return BuildReport(Path(out), manifest.n_images, manifest.n_captions, tuple(skipped),
                       time.perf_counter() - started, stages, changes.result(samples, skipped))
