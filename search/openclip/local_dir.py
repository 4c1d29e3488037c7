"""open_clip local-dir folders: `CONFIG_FILE` ({"model_cfg": ..., "preprocess_cfg": ...}) beside the weights, loadable
with `--model local-dir:FOLDER`. How this project writes one, and a randomly initialised one.

A folder is self-contained: open_clip reads a local-dir's Hugging Face tokenizer (text_cfg.hf_tokenizer_name set:
SigLIP, SigLIP2, XLM-R / NLLB towers) from the folder itself, so its files are saved beside the weights; a Hugging Face
text tower's model config is saved there too as `HF_CONFIG_FILE`, named in CONFIG_FILE under `HF_CONFIG_KEY`
(loading.py then builds the tower from it)."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from ..encoders import LOCAL_DIR_PREFIX, EncoderSpec
from ..errors import ModelLoadError
from . import CONFIG_FILE, HF_CONFIG_FILE, HF_CONFIG_KEY, WEIGHTS_FILE
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


def _save_text_files(model: torch.nn.Module, folder: Path, model_cfg: dict, tokenizer) -> dict:
    """The tokenizer's and the HF text tower's files into `folder`; what CONFIG_FILE then holds to load them."""
    text_cfg = dict(model_cfg.get("text_cfg") or {})
    if hasattr(tokenizer, "save_pretrained"):  # open_clip's HFTokenizer / SigLipTokenizer (CLIP's BPE needs no files)
        tokenizer.save_pretrained(str(folder))
        text_cfg["hf_tokenizer_name"] = text_cfg.get("hf_tokenizer_name") or str(folder)  # set: read from the folder
    config = {"model_cfg": {**model_cfg, "text_cfg": text_cfg} if "text_cfg" in model_cfg else model_cfg}
    hf_config = getattr(getattr(model, "text", None), "config", None)
    if text_cfg.get("hf_model_name") and hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(str(folder))  # the tower's architecture: rebuilt without a download
        config[HF_CONFIG_KEY] = HF_CONFIG_FILE
    return config


def _write_folder(model: torch.nn.Module, folder: Path, model_cfg: dict, tokenizer=None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _save_text_files(model, folder, model_cfg, tokenizer)
    visual = model.visual
    # all of open_clip's preprocessing settings (SigLIP squashes, MobileCLIP2 resizes bilinearly), not just mean/std
    preprocess_cfg = {name: value for name, value in (getattr(visual, "preprocess_cfg", None) or {}).items()
                      if name != "size" and value is not None}  # the size is the model's own
    preprocess_cfg.update({"mean": list(visual.image_mean or ()), "std": list(visual.image_std or ())})
    config["preprocess_cfg"] = {k: v for k, v in preprocess_cfg.items() if v}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder


def save_local_dir(encoder: OpenClipEncoder, folder: Path, model_cfg: dict | None = None) -> Path:
    """Write `encoder`'s weights (and tokenizer files) as a local-dir folder; `model_cfg` defaults to the config its
    spec was built from. Raises ModelLoadError for an encoder reparameterised for inference (its layout is not the
    config's: save the model loaded for training)."""
    if encoder.reparameterized:
        raise ModelLoadError(f"{encoder.spec} was reparameterised for inference; save the model loaded for training")
    return _write_folder(encoder.model, folder, model_cfg if model_cfg is not None else model_config(encoder.spec),
                         encoder.tokenizer)


def _config_tokenizer(model_cfg: dict, folder: Path):
    """The HF tokenizer a model config names (a hub name or another folder), to be copied; None when none is named
    or it is in `folder` already."""
    name = (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
    if not name or (Path(name).is_dir() and Path(name).resolve() == folder.resolve()):
        return None
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(name)


def init_local_dir(model_cfg: dict, folder: Path, seed: int = 0) -> Path:
    """Create a randomly initialised model from an open_clip model config and save it as a local-dir folder (with the
    tokenizer and HF text config the model config names, copied in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _config_tokenizer(model_cfg, folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg}), encoding="utf-8")
    torch.manual_seed(seed)
    spec = EncoderSpec.from_args(LOCAL_DIR_PREFIX + str(folder), None)
    # no weights yet: random init, also of an HF text tower (no download of its pretrained weights)
    model, _, _ = open_clip.create_model_and_transforms(spec.model, pretrained_text=False)
    return _write_folder(model, folder, model_cfg, tokenizer)
