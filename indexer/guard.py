"""Fine-tuning that cannot quietly regress: recall on a second, general "guard" set before training and after every
epoch, and WiSE-FT weight interpolation between the original and the fine-tuned model.

The guard number of a model is the mean of its R@1, R@5 and R@10 in both directions on the guard set, in percentage
points (exact search, the code `search eval` uses). An epoch whose guard number is more than `max_regression` points
below the original model's is never kept: the Trainer keeps the best epoch (by validation recall, as without a guard)
among the safe ones; when none is safe the original weights are written and the run's outcome says it was refused.

With `alphas` (WiSE-FT, Wortsman et al. 2022: θ = (1−α)·θ_original + α·θ_finetuned) the run ends by measuring
validation and guard recall of the interpolated weights for each α (0 and 1 always included) and keeps the α with
the highest validation recall among the safe ones (without a validation split: the largest safe α). θ_finetuned is
the epoch the run keeps, or, when the guard refused every epoch, the epoch with the best validation recall.

Everything is recorded in training.json: `baseline` (epoch 0: the original model's "val" and "guard"), each epoch's
"guard" (recall, mean, regression, safe), `guard` (set, bound, metric), `interpolation` (the α table) and `outcome`.
The model is reached only through the training wrapper (ClipTask).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch

from search.atomic import replace_dir, write_atomic
from search.encoders import Encoder
from search.errors import EngineError
from search.metrics import KS
from search.openclip.training import ClipTask
from search.recall import DIRECTIONS, RetrievalRecall

from .finetune import _captioned, epoch_score, validate
from .model_folder import RUN_FILE, STATE_DIR
from .readers import Sample

log = logging.getLogger(__name__)

DEFAULT_MAX_REGRESSION = 2.0  # points of the guard number
GUARD_METRIC = "mean of R@1, R@5, R@10 in both directions (percentage points)"
ENDPOINT_FILE = "finetuned.pt"  # in the state folder: θ_finetuned for the interpolation, kept across --resume
PLOT_FILE = "training.png"


@dataclass(frozen=True)
class GuardConfig:
    """`samples`/`images_root`/`source`: the guard set (None: no guard, e.g. interpolation alone);
    `alphas`: the --interpolate values, 0 and 1 added (empty: no interpolation)."""

    samples: tuple[Sample, ...] | None = None
    images_root: Path | None = None
    source: dict | None = None
    max_regression: float = DEFAULT_MAX_REGRESSION
    alphas: tuple[float, ...] = ()
    max_images: int = 1000


def recall_mean(metrics: dict) -> float:
    """The guard number: mean of R@1/5/10 in both directions of a "val"-shaped recall dict."""
    return float(np.mean([metrics[key][f"R@{k}"] for key, _ in DIRECTIONS for k in KS]))


def interpolated(original: dict, finetuned: dict, alpha: float) -> dict:
    """WiSE-FT weights (1−α)·original + α·finetuned; exactly `original` at α=0 and `finetuned` at α=1; tensors that
    are not floating point (none in CLIP, but buffers could be) come from `finetuned`."""
    if alpha == 0:
        return original
    if alpha == 1:
        return finetuned
    return {name: torch.lerp(value, finetuned[name], alpha) if value.is_floating_point() else finetuned[name]
            for name, value in original.items()}


def _cpu_copy(state: dict) -> dict:
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


class Guard:
    """The Trainer's hooks for a guarded and/or interpolated run. Build it with the freshly loaded task, before any
    resume replaces its weights: it keeps a copy of the original weights."""

    def __init__(self, config: GuardConfig, task: ClipTask):
        self.config = config
        self.samples = None
        if config.samples is not None:
            self.samples = _captioned(config.samples, config.images_root, "guard")[:config.max_images]
        if config.max_regression < 0:
            raise EngineError("--max-regression must be at least 0 points")
        # measured in this order, 0 (the original) and 1 (θ_finetuned) always among them
        self.alphas = tuple(sorted(set(config.alphas) | {0.0, 1.0})) if config.alphas else ()
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise EngineError("--interpolate values must lie between 0 and 1")
        self.original = _cpu_copy(task.state_dict())
        self.endpoint: dict | None = None  # θ_finetuned while this process holds it

    # -- measuring ----------------------------------------------------------------------------------------------------

    def measure(self, encoder: Encoder, baseline: dict | None) -> dict:
        """Guard recall of the encoder's current weights, its mean, and against `baseline` (a measured guard dict)
        the regression in points and whether it is within the bound."""
        metrics = validate(encoder, self.samples, self.config.images_root)
        metrics["mean"] = recall_mean(metrics)
        if baseline is not None:
            metrics["regression"] = round(baseline["mean"] - metrics["mean"], 6)
            metrics["safe"] = metrics["regression"] <= self.config.max_regression
        return metrics

    def _both(self, trainer) -> dict:
        record = {}
        if trainer.val_samples:
            record["val"] = validate(trainer.task.encoder, trainer.val_samples, trainer.root)
        if self.samples:
            record["guard"] = self.measure(trainer.task.encoder, self._baseline(trainer))
        return record

    @staticmethod
    def _baseline(trainer) -> dict | None:
        return (trainer.run.get("baseline") or {}).get("guard")

    # -- the Trainer's hooks ------------------------------------------------------------------------------------------

    def start(self, trainer) -> None:
        """Before the first epoch: record the set and measure the original model (once; a resumed run has it)."""
        settings = {"source": self.config.source, "max_regression": self.config.max_regression,
                    "metric": GUARD_METRIC, "images": len(self.samples)} if self.samples else None
        if trainer.run["history"]:  # resumed
            if trainer.run.get("guard") != settings:
                raise EngineError(f"{trainer.out} holds a run with another guard set or --max-regression; resume "
                                  f"with the same arguments")
            return
        trainer.run["guard"] = settings
        trainer.task.eval()
        trainer.run["baseline"] = {"epoch": 0, **self._both(trainer)}
        if self.samples:
            log.info("guard set: %s before training (mean %.1f)",
                     RetrievalRecall.from_json(trainer.run["baseline"]["guard"]).format(),
                     trainer.run["baseline"]["guard"]["mean"])

    def after_epoch(self, trainer, record: dict) -> None:
        """After the epoch's validation, the model in eval mode: its guard recall into `record`."""
        if self.samples:
            record["guard"] = self.measure(trainer.task.encoder, self._baseline(trainer))
            if not record["guard"]["safe"]:
                log.warning("epoch %d lost %.1f points on the guard set (more than %g): it will not be kept",
                            record["epoch"], record["guard"]["regression"], self.config.max_regression)

    def keeps(self, record: dict) -> bool:
        return is_safe(record)

    def checkpoint(self, trainer, epoch: int) -> None:
        """After the epoch's model was (or was not) saved, before the resumable state is: keep θ_finetuned."""
        if self.alphas and _endpoint_epoch(trainer.run) == epoch:
            self.endpoint = _cpu_copy(trainer.task.state_dict())
            (trainer.out / STATE_DIR).mkdir(exist_ok=True)
            write_atomic(trainer.out / STATE_DIR / ENDPOINT_FILE, lambda tmp: torch.save(self.endpoint, tmp))

    def finish(self, trainer) -> None:
        """After the last epoch: interpolate, fall back to the original weights when nothing is safe, and record the
        outcome (run["outcome"]: kept, refused, message). Done once per step count (a finished run resumed again
        changes nothing)."""
        run = trainer.run
        if run.get("outcome", {}).get("steps") == run["steps"]:
            return
        kept, unguarded = run["best_epoch"], _best_epoch(run, guarded=False)
        outcome = {"steps": run["steps"], "kept_epoch": kept, "alpha": None, "refused": False}
        if self.alphas:
            alpha = self._interpolate(trainer)
            outcome["alpha"] = alpha
            outcome["message"] = self._describe_alpha(run, alpha)
            outcome["refused"] = alpha == 0 and kept is None and self.samples is not None
        elif kept is None and self.samples:
            self._write(trainer, self.original)
            outcome["refused"] = True
        if outcome["refused"]:
            least = min(run["history"], key=lambda r: r["guard"]["regression"])
            outcome["message"] = (f"every epoch lost more than {self.config.max_regression:g} points on the guard set "
                                  f"(least: epoch {least['epoch']}, {least['guard']['regression']:.1f}); the "
                                  f"original weights stay")
        elif "message" not in outcome and self.samples:
            outcome["message"] = _describe_epochs(run, kept, unguarded)
        run["outcome"] = outcome
        write_atomic(trainer.out / RUN_FILE, json.dumps(run, indent=2))

    # -- interpolation ------------------------------------------------------------------------------------------------

    def _interpolate(self, trainer) -> float:
        run = trainer.run
        endpoint = self.endpoint
        if endpoint is None:
            path = trainer.out / STATE_DIR / ENDPOINT_FILE
            if not path.is_file():
                raise EngineError(f"{trainer.out} has no fine-tuned weights to interpolate "
                                  f"({STATE_DIR}/{ENDPOINT_FILE}): train again without --resume")
            endpoint = torch.load(path, map_location="cpu", weights_only=True)
        trainer.task.eval()
        table = []
        for alpha in self.alphas:
            trainer.task.load_state_dict(interpolated(self.original, endpoint, alpha))
            row = {"alpha": alpha, **self._both(trainer)}
            table.append(row)
            log.info("α=%g: %s", alpha, _describe_row(row))
        safe = [row for row in table if is_safe(row)]  # α=0 always is: regression 0
        chosen = max(safe, key=lambda row: (epoch_score(row, row["alpha"]), row["alpha"]))
        run["interpolation"] = {"endpoint_epoch": _endpoint_epoch(run), "table": table, "chosen_alpha": chosen["alpha"]}
        self._write(trainer, interpolated(self.original, endpoint, chosen["alpha"]))
        return chosen["alpha"]

    def _write(self, trainer, state: dict) -> None:
        trainer.task.load_state_dict(state)
        replace_dir(trainer.out, trainer.task.save, keep=(STATE_DIR,))

    def _describe_alpha(self, run: dict, alpha: float) -> str:
        endpoint = run["interpolation"]["endpoint_epoch"]
        row = next(r for r in run["interpolation"]["table"] if r["alpha"] == alpha)
        what = ("the original weights" if alpha == 0 else f"epoch {endpoint}" if alpha == 1 else
                f"α={alpha:g} between the original weights and epoch {endpoint}")
        refused = (f"every epoch lost more than {self.config.max_regression:g} points on the guard set; "
                   if run["best_epoch"] is None and self.samples else "")
        measured = len(run["interpolation"]["table"])
        return f"{refused}keeping {what} (WiSE-FT, {measured} α measured): {_describe_row(row)}"


def _best_epoch(run: dict, guarded: bool) -> int | None:
    """The epoch with the best validation recall (the latest without validation), among the safe ones if
    `guarded`; None when there is none."""
    records = [r for r in run["history"] if not guarded or is_safe(r)]
    if not records:
        return None
    return max(records, key=lambda r: (epoch_score(r, r["epoch"]), -r["epoch"]))["epoch"]


def _endpoint_epoch(run: dict) -> int | None:
    """θ_finetuned: the epoch the run keeps, else (every epoch refused) the best one by validation recall."""
    return run["best_epoch"] if run["best_epoch"] is not None else _best_epoch(run, guarded=False)


def _change(record: dict) -> float:
    """The guard number's change in points (+ 0.0: no '-0.0')."""
    return -record["guard"]["regression"] + 0.0


def _describe_row(row: dict) -> str:
    parts = []
    if "val" in row:  # R@5 to read, and the score that chooses (the sum of R@1/5/10 of both directions)
        parts.append(f"val {RetrievalRecall.from_json(row['val']).format(ks=(5,))} (score "
                     f"{epoch_score(row, 0):.1f})")
    if "guard" in row:
        parts.append(f"guard mean {row['guard']['mean']:.1f} ({_change(row):+.1f} points)")
    return "; ".join(parts)


def _describe_epochs(run: dict, kept: int, unguarded: int | None) -> str:
    """'epoch 3 lost 7.1 points on the guard set; keeping epoch 1', or the kept epoch's guard change."""
    record = {r["epoch"]: r for r in run["history"]}
    if unguarded is not None and unguarded != kept:
        return (f"epoch {unguarded} lost {record[unguarded]['guard']['regression']:.1f} points on the guard set; "
                f"keeping epoch {kept}")
    return f"epoch {kept} is within the guard bound ({_change(record[kept]):+.1f} points on the guard set)"


def format_interpolation(run: dict) -> list[str]:
    """The α table of an interpolated run, one line per α (empty without interpolation)."""
    table = (run.get("interpolation") or {}).get("table", [])
    chosen = (run.get("interpolation") or {}).get("chosen_alpha")
    return [f"α={row['alpha']:<5g} {_describe_row(row)}{'' if is_safe(row) else ' (unsafe)'}"
            f"{'  ← kept' if row['alpha'] == chosen else ''}" for row in table]


def is_safe(record: dict) -> bool:
    """Whether an epoch record or α row stays within the guard bound (always, without a guard)."""
    return "guard" not in record or record["guard"]["safe"]


def write_epoch_plot(folder: Path, run: dict) -> Path | None:
    """training.png beside training.json: recall per epoch (validation and guard; the baseline as epoch 0). None
    when no epoch measured recall."""
    from search.plots import to_png_bytes, training_curve  # matplotlib: imported when a plot is drawn

    figure = training_curve(run)
    if figure is None:
        return None
    path = Path(folder) / PLOT_FILE
    write_atomic(path, to_png_bytes(figure))
    return path
