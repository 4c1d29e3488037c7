"""Contrastive fine-tuning of the dual encoder on captioned images.

Symmetric InfoNCE (open_clip's ClipLoss) with the model's learnable temperature, AdamW with linear warm-up and cosine
decay, open_clip's training transform, optional locked towers, gradient accumulation with cached features (so an
accumulated batch has the negatives of the full batch, as in open_clip's accum_freq), autocast on GPU. After each
epoch: mean loss and validation recall@k computed by search.metrics (the code `search eval` uses); the best epoch is
written as an open_clip local-dir folder. A resumable state is kept after every epoch.

The budget is a number of optimisation steps (all of --epochs, or --max-steps), never wall-clock time: every machine
trains the same model, up to float rounding.
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from search.encoders import LOCAL_DIR_PREFIX, Encoder, EncoderSpec
from search.errors import DatasetError, EngineError, ImageReadError
from search.images import load_image
from search.metrics import retrieval_metrics
from search.recall import RetrievalRecall
from search.openclip import CONFIG_FILE
from search.openclip.local_dir import init_local_dir
from search.openclip.training import ClipTask

from .model_folder import OWN_INIT, RUN_FILE, STATE_DIR, work_dir  # noqa: F401 (re-exported)
from .readers import Sample
from search.atomic import replace_dir, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 5
    batch_size: int = 128  # effective batch: the contrastive negatives of one step
    accum_steps: int = 1  # micro-batches per step; each holds batch_size / accum_steps pairs
    lr: float | None = None  # default: 1e-5 from pretrained weights, 5e-4 from random initialisation
    weight_decay: float = 0.1
    warmup: float = 0.05  # share of all steps spent warming up
    lock_image: bool = False
    lock_text: bool = False
    workers: int = 1
    seed: int = 0
    max_val_images: int = 1000
    max_steps: int | None = None  # stop after this many optimisation steps in all; the LR schedule ends there
    progress: bool = True


class PairDataset(Dataset):
    """Item i: image i through the training transform, with one of its captions picked per epoch."""

    def __init__(self, samples: Sequence[Sample], images_root: Path, task: ClipTask, seed: int):
        self.samples, self.root, self.task, self.seed, self.epoch = list(samples), Path(images_root), task, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        caption = random.Random(hash((self.seed, self.epoch, i))).choice(sample.captions)
        try:
            image = load_image(self.root / sample.image)
        except ImageReadError as exc:
            log.warning("skipped in training: %s", exc)
            return None
        return self.task.train_transform(image), caption

    def collate(self, items):
        items = [item for item in items if item is not None]
        return torch.stack([pixels for pixels, _ in items]), self.task.tokenize([text for _, text in items])


def _captioned(samples: Sequence[Sample], images_root: Path, what: str) -> list[Sample]:
    usable = [s for s in samples if s.captions and (Path(images_root) / s.image).is_file()]
    if not usable:
        raise DatasetError(f"the {what} split has no captioned images that exist under {images_root}")
    if len(usable) < len(samples):
        log.warning("%s split: %d of %d images are missing or have no captions; training without them",
                    what, len(samples) - len(usable), len(samples))
    return usable


def validate(encoder: Encoder, samples: Sequence[Sample], images_root: Path) -> dict:
    """Recall@k of the current weights on a validation split (exact search, same metric code as `search eval`), in
    training.json's "val" shape. A loaded encoder is in eval mode; the Trainer switches its model to eval mode before
    it validates."""
    images = [load_image(Path(images_root) / s.image) for s in samples]
    image_vectors = encoder.encode_images(images)
    texts = [c for s in samples for c in s.captions]
    truth = np.repeat(np.arange(len(samples)), [len(s.captions) for s in samples])
    return retrieval_metrics(image_vectors, encoder.encode_texts(texts), truth).to_json()


def _schedule(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimizer(task: ClipTask, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as open_clip trains CLIP; the task says which parameters get no weight decay."""
    return torch.optim.AdamW(task.parameter_groups(weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)


class Trainer:
    def __init__(self, task: ClipTask, train: Sequence[Sample], val: Sequence[Sample] | None,
                 images_root: Path, out: Path, config: FinetuneConfig, source: dict, from_random: bool,
                 recipe: dict | None = None, guard=None):
        """`task`: the model to train (from `load_for_training`); the Trainer reaches it only through that wrapper.
        `recipe`: anything the caller wants recorded with the run in training.json (the demo's recipe).
        `guard`: an indexer.guard.Guard (guard-set recall per epoch, unsafe epochs never kept, WiSE-FT at the end)."""
        self.task, self.config, self.out, self.root = task, config, Path(out), Path(images_root)
        self.guard = guard
        self.train_samples = _captioned(train, images_root, "training")
        self.val_samples = _captioned(val, images_root, "validation")[:config.max_val_images] if val else None
        if config.batch_size % config.accum_steps:
            raise EngineError("--batch-size must be a multiple of --accum-steps")
        if len(self.train_samples) < config.batch_size:
            raise DatasetError(f"the training split has {len(self.train_samples)} captioned images, fewer than one "
                               f"batch of {config.batch_size}; lower --batch-size")
        torch.manual_seed(config.seed)
        task.lock_towers(config.lock_image, config.lock_text)
        if not task.trains_a_tower():
            raise EngineError("both towers are locked: nothing to train (the temperature alone changes no ranking)")
        self.lr = config.lr or (5e-4 if from_random else 1e-5)
        self.dataset = PairDataset(self.train_samples, images_root, task, config.seed)
        self.steps_per_epoch = len(self.train_samples) // config.batch_size
        if config.max_steps is not None and config.max_steps < 1:
            raise EngineError("--max-steps must be at least 1")
        self.total_steps = min(self.steps_per_epoch * config.epochs, config.max_steps or math.inf)
        self.optimizer = _optimizer(task, self.lr, config.weight_decay)
        self.scheduler = _schedule(self.optimizer, self.total_steps, max(1, int(self.total_steps * config.warmup)))
        cuda = task.device.type == "cuda"
        self.autocast_dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.loss_fn = task.contrastive_loss()
        base = task.spec.to_dict()
        if base["model"] == f"{LOCAL_DIR_PREFIX}{(self.out / STATE_DIR / 'init').resolve()}":
            base["model"] = OWN_INIT  # not an absolute path: the folder may be swapped into place elsewhere
        self.run = {"base_model": base, "from_random": from_random, "source": source,
                    "config": {**asdict(config), "lr": self.lr}, "planned_steps": self.total_steps, "steps": 0,
                    "history": [], "best_epoch": None, **({"recipe": recipe} if recipe is not None else {})}
        self.best_score = -1.0
        self.first_epoch = 1

    # -- one optimisation step --------------------------------------------------------------------------------------

    def _forward(self, pixels, tokens):
        if self.autocast_dtype is None:
            return self.task.forward_features(pixels, tokens)
        with torch.autocast("cuda", dtype=self.autocast_dtype):
            return self.task.forward_features(pixels, tokens)

    def _backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, pixels: torch.Tensor, tokens: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.accum_steps == 1:
            image_f, text_f, *scale = self._forward(pixels, tokens)  # scale: [logit scale] (+ SigLIP's logit bias)
            loss = self.loss_fn(image_f, text_f, *scale)
            self._backward(loss)
            value = float(loss.detach())
        else:  # features of every micro-batch without grad, then each micro-batch again with grad against them all
            chunks = list(zip(pixels.chunk(self.config.accum_steps), tokens.chunk(self.config.accum_steps)))
            with torch.no_grad():
                cached = [self._forward(p, t)[:2] for p, t in chunks]
            value = 0.0
            for j, (p, t) in enumerate(chunks):
                image_j, text_j, *scale = self._forward(p, t)
                scale = scale if j == 0 else [s.detach() for s in scale]  # their gradient counted once, not per chunk
                images = torch.cat([image_j if i == j else c[0] for i, c in enumerate(cached)])
                texts = torch.cat([text_j if i == j else c[1] for i, c in enumerate(cached)])
                loss = self.loss_fn(images, texts, *scale)
                self._backward(loss)
                value = float(loss.detach())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.task.clamp_logit_scale()
        return value

    # -- epochs, checkpoints ----------------------------------------------------------------------------------------

    def fit(self, on_epoch: Callable[[dict], None] | None = None) -> dict:
        """Train until `total_steps` optimisation steps are done in all (a resumed run counts its earlier ones);
        validate and checkpoint after every epoch, and after the last, possibly partial, one. `on_epoch(record)`, when
        given, is called after each epoch's checkpoint with its training.json history record, the model in eval mode
        (e.g. a benchmark measuring test recall against training time); the next epoch switches back to train mode."""
        started = time.perf_counter()
        # one bar over every step of the run, so its ETA is for the whole training; smoothing 0 = the mean rate so
        # far, validation pauses included
        bar = tqdm(total=self.total_steps, initial=self.run["steps"], desc="training", unit="step", smoothing=0,
                   disable=not self.config.progress)
        with bar:
            if self.guard is not None:
                self.guard.start(self)
            for epoch in range(self.first_epoch, self.config.epochs + 1):
                if self.run["steps"] >= self.total_steps:
                    break
                self._epoch(epoch, started, bar)
                if on_epoch is not None:
                    on_epoch(self.run["history"][-1])
        if self.guard is not None:
            self.guard.finish(self)
        return self.run

    def _epoch(self, epoch: int, started: float, bar: tqdm) -> None:
        self.dataset.epoch = epoch
        torch.manual_seed(self.config.seed * 1000 + epoch)  # augmentation depends on (seed, epoch) only: resumable
        loader = DataLoader(self.dataset, batch_size=self.config.batch_size, shuffle=True, drop_last=True,
                            num_workers=self.config.workers, collate_fn=self.dataset.collate,
                            generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch),
                            worker_init_fn=lambda _: torch.set_num_threads(1))
        self.task.train()
        tick, losses, pairs = time.perf_counter(), [], 0
        for pixels, tokens in loader:
            losses.append(self.step(pixels, tokens))
            pairs += len(pixels)
            self.run["steps"] += 1
            bar.set_postfix(epoch=f"{epoch}/{self.config.epochs}", loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
            if self.run["steps"] >= self.total_steps:
                break
        seconds = time.perf_counter() - tick
        record = {"epoch": epoch, "steps": len(losses), "loss": float(np.mean(losses)) if losses else None,
                  "seconds": round(seconds, 2), "pairs_per_second": round(pairs / seconds, 1) if seconds else None,
                  "lr": self.scheduler.get_last_lr()[-1], "elapsed_seconds": round(time.perf_counter() - started, 1)}
        self.task.eval()  # also for whatever the caller does with the model between epochs
        if self.val_samples:
            record["val"] = validate(self.task.encoder, self.val_samples, self.root)
        if self.guard is not None:
            self.guard.after_epoch(self, record)
        self.run["history"].append(record)
        with tqdm.external_write_mode(file=sys.stderr):  # the log line above the bar, not through it
            log.info("epoch %d (step %d of %d): %s", epoch, self.run["steps"], self.total_steps, _describe(record))
        self._checkpoint(epoch, record)

    def _checkpoint(self, epoch: int, record: dict) -> None:
        score = epoch_score(record, epoch)
        if score > self.best_score and (self.guard is None or self.guard.keeps(record)):
            self.best_score = score
            self.run["best_epoch"] = epoch
            replace_dir(self.out, self.task.save, keep=(STATE_DIR,))
        self.out.mkdir(parents=True, exist_ok=True)  # a guard may have refused every epoch so far
        if self.guard is not None:
            self.guard.checkpoint(self, epoch)
        write_atomic(self.out / RUN_FILE, json.dumps(self.run, indent=2))
        state = {"epoch": epoch, "model": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "best_score": self.best_score, "run": self.run,
                 "scaler": self.scaler.state_dict() if self.scaler else None}
        (self.out / STATE_DIR).mkdir(exist_ok=True)
        write_atomic(self.out / STATE_DIR / "state.pt", lambda tmp: torch.save(state, tmp))

    def resume(self) -> None:
        """Continue from the state saved after the last epoch (a run stopped mid-epoch by its step budget and resumed
        with a larger one goes on with the next epoch)."""
        path = self.out / STATE_DIR / "state.pt"
        if not path.is_file():
            raise EngineError(f"nothing to resume in {self.out} (no {STATE_DIR}/state.pt)")
        state = torch.load(path, map_location=self.task.device, weights_only=False)
        if state["run"]["base_model"] != self.run["base_model"] or state["run"]["source"] != self.run["source"]:
            raise EngineError(f"{self.out} holds a run with another model or dataset; resume with the same arguments")
        self.task.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best_score, self.run, self.first_epoch = state["best_score"], state["run"], state["epoch"] + 1
        self.run.setdefault("steps", state["epoch"] * self.steps_per_epoch)  # saved before steps were counted
        self.run["config"].update(epochs=self.config.epochs, max_steps=self.config.max_steps)
        self.run["planned_steps"] = self.total_steps
        log.info("resuming after epoch %d of %d (step %d of %d)", state["epoch"], self.config.epochs,
                 self.run["steps"], self.total_steps)


def epoch_score(record: dict, fallback: float) -> float:
    """What picks the epoch kept: the sum of validation R@1/5/10 in both directions, or `fallback` (the epoch
    number: the latest) without validation."""
    val = record.get("val")
    return (sum(val[d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))
            if val else float(fallback))


def _describe(record: dict) -> str:
    text = f"loss {record['loss']:.4f}, {record['seconds']:.0f} s, {record['pairs_per_second']} pairs/s"
    if "val" in record:
        text += f"; val {RetrievalRecall.from_json(record['val']).format()}"
    if "guard" in record:
        text += f"; guard mean {record['guard']['mean']:.1f} ({0.0 - record['guard']['regression']:+.1f} points)"
    return text


def load_for_training(model: str, pretrained: str | None, out: Path, device: str | None,
                      seed: int) -> tuple[ClipTask, bool]:
    """The model to start from, as the training wrapper the Trainer takes, and whether its weights are random.
    `model` may be an open_clip model config JSON file: a custom architecture, randomly initialised (kept in the
    run's state folder so --resume finds it)."""
    if model.endswith(".json") and Path(model).is_file():
        config = json.loads(Path(model).read_text(encoding="utf-8"))
        folder = out / STATE_DIR / "init"
        if not (folder / CONFIG_FILE).is_file():
            init_local_dir(config.get("model_cfg", config), folder, seed)
        return ClipTask.load(EncoderSpec.from_args(f"{LOCAL_DIR_PREFIX}{folder}", None), device=device), True
    spec = EncoderSpec.from_args(model, pretrained)
    return ClipTask.load(spec, device=device), spec.pretrained == "none"
