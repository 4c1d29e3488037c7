"""open_clip local-dir folders: `CONFIG_FILE` ({"model_cfg": ..., "preprocess_cfg": ...}) beside the weights, loadable
with `--model local-dir:FOLDER`. How this project writes one, and a randomly initialised one."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from ..encoders import LOCAL_DIR_PREFIX, EncoderSpec
from . import CONFIG_FILE, WEIGHTS_FILE
from .encoder import OpenClipEncoder
from .loading import hub_repo, local_folder


def model_config(spec: EncoderSpec) -> dict:
    """The open_clip model config `spec`'s model is built from (what a local-dir folder needs to rebuild it)."""
    folder, repo = local_folder(spec), hub_repo(spec)
    if folder is not None:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]
    if repo is not None:
        from open_clip.factory import _get_hf_config

        return _get_hf_config(repo)["model_cfg"]
    return open_clip.get_model_config(spec.model)


def _write_folder(model: torch.nn.Module, folder: Path, model_cfg: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    visual = model.visual
    preprocess_cfg = {"mean": list(visual.image_mean or ()), "std": list(visual.image_std or ())}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {k: v for k, v in preprocess_cfg.items() if v}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder


def save_local_dir(encoder: OpenClipEncoder, folder: Path, model_cfg: dict | None = None) -> Path:
    """Write `encoder`'s weights as a local-dir folder; `model_cfg` defaults to the config its spec was built from."""
    return _write_folder(encoder.model, folder, model_cfg if model_cfg is not None else model_config(encoder.spec))


def init_local_dir(model_cfg: dict, folder: Path, seed: int = 0) -> Path:
    """Create a randomly initialised model from an open_clip model config and save it as a local-dir folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg}), encoding="utf-8")
    torch.manual_seed(seed)
    spec = EncoderSpec.from_args(LOCAL_DIR_PREFIX + str(folder), None)
    model, _, _ = open_clip.create_model_and_transforms(spec.model)  # no weights yet: random init
    return _write_folder(model, folder, model_cfg)
