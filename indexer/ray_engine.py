"""`--engine ray`: the build's read → decode → encode stages on a Ray cluster, the write stage on this machine.

The samples are cut into fixed partitions (`partition_samples` each, in sample order). Partitions not finished yet
become one Ray Dataset: reading, decoding and preprocessing run as Ray tasks (CPU), encoding in an actor pool
(`ActorPoolStrategy`; one GPU per actor when the cluster has GPUs). The driver gathers each partition's rows as they
arrive and writes the partition once, atomically, to `.NAME.partial/ray-parts/` (search/layout.py); a partition on
disk is never computed again, so `--resume` after a killed driver continues from there. Then the partitions go through
the same IndexWriter as a local build, in sample order, so ids, catalog and vectors equal a local build's.

Faults: Ray retries a task whose worker died and restarts a dead actor (each at most MAX_RETRIES times, then the job
fails with the reason instead of waiting for ever).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from search.atomic import write_atomic
from search.catalog import FileInfo
from search.encoders import Encoder, EncoderSpec, create_encoder
from search.errors import EngineError
from search.layout import RAY_PARTS_DIR

from .loader import Decoded, ImageLoader, Reuse, Reused, Skipped
from .readers import Sample

PARTITION_SAMPLES = 256  # samples per partition: the unit of work that is written once and resumed from
DECODE_BATCH = 16
ENCODE_BATCH = 16  # rows per actor call: small batches keep decoding and encoding overlapped (ONNX runs 16 at once)
MAX_RETRIES = 3  # per task and per actor: a worker that keeps dying fails the job rather than hanging it
ENCODED, SKIPPED, UNCHANGED = 0, 1, 2  # a sample's status in a partition file; UNCHANGED: kept by an update as is


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # HOST:PORT or "auto"; None: a local Ray on this machine
    workers: int | None = None  # encoding actors (default: one per GPU, else CPUs - 1)
    partition_samples: int = PARTITION_SAMPLES
    runtime: str = "auto"  # what the actors run the model on (resolved again on each worker's machine)
    device: str | None = None


@dataclass(frozen=True)
class Encoded:
    """A sample whose image a Ray actor encoded (duck-types `Decoded` for pipeline.write)."""
    sample: Sample
    size: tuple[int, int]
    file: FileInfo
    change: str = "new"


def part_file(work: Path, number: int) -> Path:
    return work / RAY_PARTS_DIR / f"part-{number:06d}.npz"


def pool_size(resources: dict, workers: int | None) -> int:
    """Encoding actors: as asked, else one per GPU, else CPUs - 1 (an actor per CPU starves the decoding tasks and
    can hang the dataset, ray #44687)."""
    room = resources["GPU"] or max(1, resources["CPU"] - 1)
    if workers and workers > room:  # the pool would wait for ever for resources the cluster does not have
        raise EngineError(f"--workers {workers}: the Ray cluster has {resources['CPU']} CPUs and {resources['GPU']} "
                          f"GPUs, room for {room} encoding actor(s) (one per GPU, or one CPU left for decoding)")
    return workers or room


# -- on the workers -----------------------------------------------------------------------------------------------

def decode_batch(batch: dict, root: str, shown_root: str, preprocess, max_megapixels: float,
                 min_side: int | None, pixel_shape: tuple) -> dict:
    """Ray task: read and decode the images of a batch of rows; pixels [n, *pixel_shape] float32, zeros for the rows
    not decoded (a tensor column: Ray hands it to the actor without a copy per row)."""
    loader = ImageLoader(Path(root), preprocess, max_megapixels, min_side, shown_root=Path(shown_root))
    out = {key: [] for key in ("status", "reason", "width", "height", "file_size", "mtime_ns", "sha1", "taken",
                               "pixels")}
    for image, decode in zip(batch["image"], batch["decode"]):
        loaded = loader(Sample(str(image), ())) if decode else None
        status = UNCHANGED if loaded is None else SKIPPED if isinstance(loaded, Skipped) else ENCODED
        decoded = loaded if isinstance(loaded, Decoded) else None
        out["status"].append(status)
        out["reason"].append(loaded.reason if isinstance(loaded, Skipped) else "")
        out["width"].append(decoded.size[0] if decoded else 0)
        out["height"].append(decoded.size[1] if decoded else 0)
        out["file_size"].append(decoded.file.size if decoded else 0)
        out["mtime_ns"].append(decoded.file.mtime_ns if decoded else 0)
        out["sha1"].append(decoded.file.sha1 if decoded else "")
        out["taken"].append(decoded.file.taken if decoded else 0)  # always known for a decoded file
        out["pixels"].append(decoded.pixels if decoded else None)
    shape = next((p.shape for p in out["pixels"] if p is not None), pixel_shape)
    pixels = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in out.pop("pixels")])
    return {"row": batch["row"], "texts": batch["texts"], "pixels": pixels.astype(np.float32, copy=False),
            **{key: np.array(values) for key, values in out.items()}}


class EncodeActor:
    """Ray actor: holds one encoder; encodes the decoded pixels and the texts of each batch."""

    def __init__(self, spec: dict, runtime: str, device: str | None, batch_size: int, precision: str,
                 threads: int):
        self.encoder = create_encoder(EncoderSpec.from_dict(spec), runtime, device=device, batch_size=batch_size,
                                      precision=precision)
        # this actor's share of its machine's cores (Ray sets OMP_NUM_THREADS=1 in workers, which torch follows)
        if self.encoder.runtime == "torch":
            import torch

            torch.set_num_threads(threads)
        else:
            self.encoder.threads = threads  # read when its sessions are made, on the first batch
            self.encoder.spin = False  # decoding runs in other processes on the same cores

    def __call__(self, batch: dict) -> dict:
        dim = self.encoder.dim
        encoded = [i for i, status in enumerate(batch["status"]) if status == ENCODED]
        vectors = [b""] * len(batch["status"])
        if encoded:
            pixels = batch["pixels"][encoded]
            for i, vector in zip(encoded, self.encoder.encode_pixels(pixels)):
                vectors[i] = np.asarray(vector, np.float32).tobytes()
        texts = [json.loads(t) for t in batch["texts"]]
        flat = self.encoder.encode_texts([t for row in texts for t in row]) if any(texts) else np.zeros((0, dim))
        offsets = np.cumsum([0] + [len(row) for row in texts])
        text_vectors = [np.asarray(flat[a:b], np.float32).tobytes() for a, b in zip(offsets[:-1], offsets[1:])]
        keep = ("row", "texts", "status", "reason", "width", "height", "file_size", "mtime_ns", "sha1", "taken")
        return {**{key: batch[key] for key in keep}, "image_vector": np.array(vectors, dtype=object),
                "text_vectors": np.array(text_vectors, dtype=object)}


# -- on the driver ------------------------------------------------------------------------------------------------

def dataset_rows(samples: Sequence[Sample], numbers: Sequence[int], size: int, images_root: Path,
                 reuse: Reuse | None) -> list[dict]:
    """One row per sample of the partitions `numbers`: which image to decode (not one an update keeps unchanged by
    size and mtime) and which captions to encode (not ones an update already holds)."""
    rows = []
    for number in numbers:
        for row in range(number * size, min(len(samples), (number + 1) * size)):
            sample = samples[row]
            decode = True
            if reuse is not None:
                try:
                    stat = (images_root / sample.image).stat()
                    decode = reuse.unchanged(sample.image, stat.st_size, stat.st_mtime_ns) is None
                except OSError:
                    pass  # the task reports it as skipped, with the reason
            texts = [t for t in sample.captions if reuse is None or t not in reuse.captions]
            rows.append({"row": row, "image": sample.image, "decode": decode, "texts": json.dumps(texts)})
    return rows


def encode_partitions(rows: list[dict], work: Path, size: int, encoder: Encoder,
                      images_root: Path, max_megapixels: float, min_side: int | None, options: RayOptions,
                      batch_size: int, resources: dict) -> Iterator[int]:
    """Run the dataset of `rows` on Ray; write each partition's file when its last row arrives; yield the number of
    rows each arriving batch holds (for a progress bar)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # the caller's bar counts samples
    actors = pool_size(resources, options.workers)
    gpus = 1 if resources["GPU"] else 0
    pixel_shape = encoder.preprocess_image(Image.new("RGB", (8, 8))).shape
    warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // DECODE_BATCH, 512)))
    dataset = dataset.map_batches(
        decode_batch, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=0.5, max_retries=MAX_RETRIES,
        fn_kwargs=dict(root=str(Path(images_root).resolve()), shown_root=str(images_root),
                       preprocess=encoder.image_preprocessor(), max_megapixels=max_megapixels, min_side=min_side,
                       pixel_shape=pixel_shape))
    dataset = dataset.map_batches(
        EncodeActor, batch_size=min(batch_size, ENCODE_BATCH), batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=0 if gpus else 1, num_gpus=gpus, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
        fn_constructor_kwargs=dict(spec=encoder.spec.to_dict(), runtime=options.runtime, device=options.device,
                                   batch_size=batch_size, precision=encoder.precision,
                                   threads=max(1, resources["CPU"] // actors)))
    expected = {}
    for row in rows:
        expected[row["row"] // size] = expected.get(row["row"] // size, 0) + 1
    pending: dict[int, dict[int, tuple]] = {}
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i, row in enumerate(batch["row"]):
                number = int(row) // size
                pending.setdefault(number, {})[int(row)] = tuple(batch[key][i] for key in _PART_KEYS)
                if len(pending[number]) == expected[number]:
                    _write_part(part_file(work, number), pending.pop(number), encoder.dim)
            yield len(batch["row"])
    except ray.exceptions.RayError as exc:
        raise EngineError(f"the Ray job failed: {str(exc).strip().splitlines()[0]}") from None


_PART_KEYS = ("texts", "status", "reason", "width", "height", "file_size", "mtime_ns", "sha1", "taken",
              "image_vector", "text_vectors")


def _write_part(path: Path, rows: dict[int, tuple], dim: int) -> None:
    """One partition's results, rows in sample order; written to a temporary name and renamed (never half there)."""
    order = sorted(rows)
    columns = dict(zip(_PART_KEYS, zip(*(rows[r] for r in order))))
    vectors = [np.frombuffer(v, np.float32) if len(v) else np.zeros(dim, np.float32) for v in columns["image_vector"]]
    texts = [json.loads(t) for t in columns["texts"]]
    text_vectors = [np.frombuffer(v, np.float32).reshape(-1, dim) for v in columns["text_vectors"]]
    data = dict(rows=np.array(order, np.int64), status=np.array(columns["status"], np.int8),
                reason=np.array(columns["reason"], dtype=str), width=np.array(columns["width"], np.int64),
                height=np.array(columns["height"], np.int64), file_size=np.array(columns["file_size"], np.int64),
                mtime_ns=np.array(columns["mtime_ns"], np.int64), sha1=np.array(columns["sha1"], dtype=str),
                taken=np.array(columns["taken"], np.int64),
                image_vectors=np.stack(vectors), texts=np.array([t for row in texts for t in row], dtype=str),
                text_vectors=np.concatenate(text_vectors) if text_vectors else np.zeros((0, dim), np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, **data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_part(path: Path, samples: Sequence[Sample], reuse: Reuse | None):
    """(kept items in sample order, their image vectors, {text: vector} of the captions encoded, skip records): a
    partition file turned into what a local build's loader and encode step give (same reuse rules)."""
    with np.load(path) as data:
        part = {key: data[key] for key in data.files}
    items, vectors, skipped = [], [], []
    for i, row in enumerate(part["rows"]):
        sample, status = samples[int(row)], int(part["status"][i])
        if status == SKIPPED:
            skipped.append({"path": sample.image, "reason": str(part["reason"][i])})
            continue
        if status == UNCHANGED:
            record = reuse.records[sample.image]
            item = Reused(sample, (record.width, record.height), reuse.image_vectors[record.id],
                          reuse.file_of(record))
        else:
            taken = int(part["taken"][i]) if "taken" in part else None  # None: a part an older version wrote
            file = FileInfo(int(part["file_size"][i]), int(part["mtime_ns"][i]), str(part["sha1"][i]), taken)
            change = "changed" if reuse and sample.image in reuse.records else "new"
            item = (reuse and reuse.by_content(sample, file)) or Encoded(
                sample, (int(part["width"][i]), int(part["height"][i])), file, change)
        items.append(item)
        vectors.append(item.vector if isinstance(item, Reused) else part["image_vectors"][i])
    fresh = dict(zip((str(t) for t in part["texts"]), part["text_vectors"]))
    return items, vectors, fresh, skipped
