"""The offline demo: generate a captioned scene dataset, train a small CLIP on it, index the held-out test split,
measure recall@k — every step skipped when its result is already on disk and was made by the current recipe
(DemoConfig), so a second run starts serving at once.

Training is budgeted in optimisation steps, so every machine gets the same model (up to float rounding); the recipe
is recorded with the dataset (demo_recipe.json) and the model (training.json "recipe"), and a result made by another
recipe, or a model that stopped short of its planned steps, is made again rather than reused.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from indexer.finetune import RUN_FILE, STATE_DIR, FinetuneConfig, Trainer, load_for_training, work_dir
from indexer.lock import WriterLock
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import dataset_source, read_dataset
from search.atomic import replace_dir, swap_into_place, write_atomic
from search.evaluation import evaluate
from search.query_features import LANGUAGES as LANGUAGE_LABELS
from search.recall import RetrievalMetrics
from search.encoders import LOCAL_DIR_PREFIX, EncoderSpec, create_encoder
from search.errors import IndexFormatError
from search.manifest import read_manifest
from search.store import open_index

from .scenes import IMAGE_DIR, LANGUAGES, generate

log = logging.getLogger(__name__)
DEMO_MODEL_CONFIG = Path(__file__).resolve().parent / "demo_clip.json"  # shipped as package data
SCENES_RECIPE = "demo_recipe.json"
LANGUAGE_NAMES = dict(LANGUAGE_LABELS)


@dataclass(frozen=True)
class DemoConfig:
    n_train: int = 10000
    n_val: int = 500
    n_test: int = 1000
    seed: int = 0
    languages: tuple[str, ...] = LANGUAGES  # five captions per image in each (demo/scenes.py)
    # 78 steps an epoch, 936 in all: about 11 minutes on 2 CPU cores, the same model everywhere (one epoch more than
    # English alone took: each epoch pairs an image with one caption of either language, so English is seen half as
    # often; 88-token captions, for Chinese's byte-level tokens, make a step about 15% slower)
    epochs: int = 12
    batch_size: int = 128
    model_config: Path = DEMO_MODEL_CONFIG
    progress: bool = True

    def finetune(self) -> FinetuneConfig:
        return FinetuneConfig(epochs=self.epochs, batch_size=self.batch_size, workers=1, seed=self.seed,
                              progress=self.progress)

    def scenes_recipe(self) -> dict:
        return {"n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test, "seed": self.seed,
                "languages": list(self.languages)}

    def model_recipe(self) -> dict:
        """Everything the trained weights depend on, as JSON values (compared with the one in training.json)."""
        tuning = {k: v for k, v in asdict(self.finetune()).items() if k != "progress"}
        model_cfg = json.loads(Path(self.model_config).read_text(encoding="utf-8"))
        model_cfg = model_cfg.get("model_cfg", model_cfg)  # the file's form as `indexer finetune --model` reads it
        return json.loads(json.dumps({"scenes": self.scenes_recipe(), "model_cfg": model_cfg, "finetune": tuning}))


@dataclass(frozen=True)
class DemoResult:
    index: Path
    model: Path
    metrics: RetrievalMetrics  # recall@k of the index over the held-out test split
    run: dict  # the model's training.json
    trained: bool  # False: the model of an earlier run was reused


SCALES = {
    "full": DemoConfig(),
    # a smoke test of the whole flow in seconds; its recall means nothing
    "tiny": DemoConfig(n_train=256, n_val=32, n_test=64, epochs=1, batch_size=64),
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dataset(folder: Path, config: DemoConfig) -> Path:
    token = folder / "Flickr8k.token.txt"
    recipe = config.scenes_recipe()
    if token.is_file():
        found = _read_json(folder / SCENES_RECIPE)
        if found == recipe:
            log.info("dataset: reusing %s", folder)
            return token
        log.info("dataset: %s was generated with %s, not %s; generating it again", folder,
                 found or "an unrecorded recipe", recipe)
    log.info("dataset: generating %d train / %d val / %d test scenes into %s", config.n_train, config.n_val,
             config.n_test, folder)
    def write(tmp: Path) -> None:
        generate(tmp, config.n_train, config.n_val, config.n_test, config.seed, languages=config.languages)
        (tmp / SCENES_RECIPE).write_text(json.dumps(recipe), encoding="utf-8")

    replace_dir(folder, write)
    return token


def _changed(old, new, path: str = "recipe") -> list[str]:
    """The dotted names of the entries that differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for key in sorted({*old, *new}) for c in _changed(old.get(key), new.get(key), f"{path}.{key}")]
    return [] if old == new else [path]


def _why_train(run: dict | None, recipe: dict) -> str | None:
    """Why the model folder's run cannot be reused for `recipe`; None when it can."""
    if run is None:
        return "no trained model yet"
    if "recipe" not in run:
        return "it was trained by an earlier version of the demo (no recorded recipe, e.g. a time-limited one)"
    if run["recipe"] != recipe:
        return f"it was trained with another recipe: {', '.join(_changed(run['recipe'], recipe))} changed"
    if run.get("steps") != run.get("planned_steps"):
        return f"its training stopped after {run.get('steps')} of {run.get('planned_steps')} steps"
    return None


def _model(folder: Path, token: Path, images: Path, config: DemoConfig, retrain: bool) -> tuple[dict, bool]:
    """(training.json of the model in `folder`, whether it was trained now). A new model is trained beside the
    folder and swapped in when complete; an interrupted training with the same recipe is resumed."""
    recipe = config.model_recipe()
    run = _read_json(folder / RUN_FILE)
    reason = "--retrain" if retrain else _why_train(run, recipe)
    if reason is None:
        log.info("model: reusing %s (trained %s, same recipe)", folder, _extent(run))
        return run, False
    work = work_dir(folder)
    pending = _read_json(work / RUN_FILE)
    resume = (work / STATE_DIR / "state.pt").is_file() and pending is not None and pending.get("recipe") == recipe
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    train = read_dataset("flickr8k", token, images, "train")
    val = read_dataset("flickr8k", token, images, "val")
    task, _ = load_for_training(str(config.model_config), "none", work, None, config.seed)
    source = dataset_source("flickr8k", token, images, "train", val_split="val")
    trainer = Trainer(task, train, val, images, work, config.finetune(), source, from_random=True, recipe=recipe)
    if resume:
        trainer.resume()
    log.info("model: training a small CLIP for %d epochs, %d steps (%s)", config.epochs, trainer.total_steps, reason)
    run = trainer.fit()
    # finished: the resumable state (optimizer moments, ~3x the model) is no longer needed; the init weights stay
    (work / STATE_DIR / "state.pt").unlink()
    swap_into_place(work, folder)
    return run, True


def _index(index: Path, model: Path, token: Path, images: Path, config: DemoConfig, rebuild: bool) -> None:
    """Build the test-split index when asked to, or unless the one on disk was built from exactly these weights."""
    encoder = create_encoder(EncoderSpec.from_args(f"{LOCAL_DIR_PREFIX}{model}", None))
    try:
        built = None if rebuild else read_manifest(index)
    except IndexFormatError:
        built = None
    if built is not None and built.encoder == encoder.spec and built.fingerprint == encoder.fingerprint:
        log.info("index: reusing %s", index)
        return
    if built is not None:
        log.info("index: %s was built from other weights than %s; building it again", index, model)
    elif rebuild:
        log.info("index: building %s from the model trained in this run", index)
    samples = read_dataset("flickr8k", token, images, "test")
    report = build_index(samples, images, encoder, index, BuildConfig(progress=config.progress, overwrite=True),
                         dataset_source("flickr8k", token, images, "test"))
    log.info("%s", report.summary())


def prepare_demo(root: Path, config: DemoConfig = DemoConfig(), retrain: bool = False) -> DemoResult:
    """Make (or reuse) the demo's dataset, model and test-split index under `root`, and measure the index's recall.
    `retrain`: train the model again even when the one on disk matches the recipe (the index follows)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with WriterLock(root):  # one preparation at a time: a second `--demo` on this folder is refused, not raced
        token = _dataset(root / "scenes", config)
        images = root / "scenes" / IMAGE_DIR
        model = root / "model"
        run, trained = _model(model, token, images, config, retrain)
        index = root / "index"
        _index(index, model, token, images, config, rebuild=trained)
        metrics = evaluate(open_index(index))
        write_atomic(root / "recall.json", json.dumps(metrics.to_json(), indent=2))
    return DemoResult(index=index, model=model, metrics=metrics, run=run, trained=trained)


def _extent(run: dict) -> str:
    return f"{len(run['history'])} epochs, {run['steps']} steps"


def summary(result: DemoResult) -> str:
    """What the demo reports after preparing: the test recall and where the model came from."""
    recall = f"test recall {result.metrics.recall.format(digits=2, ks=(1,))}"
    languages = result.metrics.languages or ()
    if languages:  # Chinese next to English
        recall += "; text→image R@1 " + ", ".join(f"{item.language} {item.recall.text_to_image.at[1]:.2f}"
                                                  for item in languages)
    if result.trained:
        model = f"model: trained {result.model} in this run ({_extent(result.run)}; {recall})"
    else:
        model = f"model: reusing {result.model} (trained {_extent(result.run)}; {recall}); --retrain to train again"
    by_language = "" if not languages else "\ntext→image by caption language: " + ", ".join(
        f"{LANGUAGE_NAMES.get(item.language, item.language)} {item.recall.text_to_image.format(digits=2)}"
        for item in languages)
    return f"Recall on the held-out test split ({result.index}):\n{result.metrics.format()}{by_language}\n{model}"
