"""The layout of a fine-tuned model folder, without torch: the CLI checks `--out` before it pays for importing a
model library.

A model folder is an open_clip local-dir folder (config + weights) plus `training.json` (settings, per-epoch history)
and, while a run is resumable, `.resume/` (optimizer state; the random initialisation of a custom architecture). A
replacement (`--overwrite`, the demo's retraining) is trained in `.NAME.training` beside it and swapped in complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from search.encoders import LOCAL_DIR_PREFIX
from search.errors import IndexExistsError
from search.openclip import CONFIG_FILE, RUN_FILE  # noqa: F401 (re-exported: the folder's layout)

STATE_DIR = ".resume"
STATE_FILE = "state.pt"
OWN_INIT = f"{LOCAL_DIR_PREFIX}{STATE_DIR}/init"  # a random initialisation kept inside the run's folder (moves with it)


def work_dir(out: Path) -> Path:
    """Where a replacement for the model folder `out` is trained: beside it, swapped into place by
    `swap_into_place` only once complete, so `out` keeps the old model until then."""
    return Path(out).parent / f".{Path(out).name}.training"


def has_resumable_state(folder: Path) -> bool:
    return (Path(folder) / STATE_DIR / STATE_FILE).is_file()


def training_folder(out: Path, resume: bool, overwrite: bool) -> Path:
    """The folder to train in: `out` itself, or with --overwrite of an existing model a work folder beside it that
    is swapped in only when training completes (an interrupted replacement continues there with --resume).
    IndexExistsError for an existing folder without --overwrite, or one that is not a model folder."""
    out = Path(out)
    work = work_dir(out)
    if resume:
        return work if has_resumable_state(work) else out
    if out.exists() and any(out.iterdir()):
        if not ((out / CONFIG_FILE).is_file() or (out / STATE_DIR).is_dir()):  # --overwrite would not help
            raise IndexExistsError(f"{out} is a non-empty directory that is not a model folder; choose another --out "
                                   f"(only a model folder is ever replaced)")
        if not overwrite:
            raise IndexExistsError(f"{out} already exists; pass --resume to continue its run or --overwrite to "
                                   f"replace it")
    else:
        work = out
    shutil.rmtree(work_dir(out), ignore_errors=True)  # a new run supersedes an interrupted --overwrite run
    return work
