"""The offline demo: generate a captioned scene dataset, train a small CLIP on it, index the held-out test split,
measure recall@k — every step skipped when its result is already on disk, so a second run starts serving at once.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from indexer.cli import load_for_training
from indexer.finetune import RUN_FILE, STATE_DIR, FinetuneConfig, Trainer
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import dataset_source, read_dataset
from indexer.scenes import IMAGE_DIR, generate
from search.cli import evaluate, format_metrics
from search.encoders import EncoderSpec, create_encoder
from search.store import open_index

log = logging.getLogger(__name__)
DEMO_MODEL_CONFIG = Path(__file__).resolve().parents[1] / "indexer" / "configs" / "demo_clip.json"


@dataclass(frozen=True)
class DemoConfig:
    n_train: int = 10000
    n_val: int = 500
    n_test: int = 1000
    seed: int = 0
    epochs: int = 11
    batch_size: int = 128
    max_minutes: float = 9.5  # the training budget: stays under 10 minutes on 2 CPU cores
    model_config: Path = DEMO_MODEL_CONFIG
    progress: bool = True


SCALES = {
    "full": DemoConfig(),
    # a smoke test of the whole flow in seconds; its recall means nothing
    "tiny": DemoConfig(n_train=256, n_val=32, n_test=64, epochs=1, batch_size=64, max_minutes=2),
}


def _dataset(folder: Path, config: DemoConfig) -> Path:
    token = folder / "Flickr8k.token.txt"
    if token.is_file():
        log.info("dataset: reusing %s", folder)
        return token
    log.info("dataset: generating %d train / %d val / %d test scenes into %s", config.n_train, config.n_val,
             config.n_test, folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, config.n_train, config.n_val, config.n_test, config.seed)
    tmp.rename(folder)
    return token


def _model(folder: Path, token: Path, images: Path, config: DemoConfig) -> Path:
    run_file = folder / RUN_FILE
    if run_file.is_file() and not (folder / STATE_DIR / "state.pt").is_file():
        log.info("model: reusing %s", folder)
        return folder
    train = read_dataset("flickr8k", token, images, "train")
    val = read_dataset("flickr8k", token, images, "val")
    encoder, _ = load_for_training(str(config.model_config), "none", folder, None, config.seed)
    finetune = FinetuneConfig(epochs=config.epochs, batch_size=config.batch_size, workers=1, seed=config.seed,
                              max_minutes=config.max_minutes, progress=config.progress)
    source = dataset_source("flickr8k", token, images, "train", val_split="val")
    trainer = Trainer(encoder, train, val, images, folder, finetune, source, from_random=True)
    if (folder / STATE_DIR / "state.pt").is_file():
        trainer.resume()
    else:
        log.info("model: training a small CLIP for up to %g minutes", config.max_minutes)
    trainer.fit()
    # finished: the resumable state (optimizer moments, ~3x the model) is no longer needed; the init weights stay
    (folder / STATE_DIR / "state.pt").unlink()
    return folder


def prepare_demo(root: Path, config: DemoConfig = DemoConfig()) -> Path:
    """Make (or reuse) the demo's dataset, model and test-split index under `root`; returns the index directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    token = _dataset(root / "scenes", config)
    images = root / "scenes" / IMAGE_DIR
    model = _model(root / "model", token, images, config)
    index = root / "index"
    if not (index / "manifest.json").is_file():
        encoder = create_encoder(EncoderSpec.from_args(f"local-dir:{model}", None))
        samples = read_dataset("flickr8k", token, images, "test")
        report = build_index(samples, images, encoder, index, BuildConfig(progress=config.progress),
                             dataset_source("flickr8k", token, images, "test"))
        log.info("%s", report.summary())
    metrics = evaluate(open_index(index))
    (root / "recall.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    print(f"Recall on the held-out test split ({index}):\n{format_metrics(metrics)}")
    return index
