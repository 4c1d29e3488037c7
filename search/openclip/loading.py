"""Building open_clip models from an `EncoderSpec`: spec checks, offline hub handling, precision, and the glue to the
fingerprint cache (search/fingerprints.py).

Loads built-in names with a pretrained tag or checkpoint file, `local-dir:PATH` folders (open_clip_config.json +
weights) and `hf-hub:ORG/REPO`. Every failure becomes a one-line ModelLoadError.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable

import open_clip
import torch

from ..encoders import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, PRECISIONS, EncoderSpec
from ..errors import ModelLoadError
from ..fingerprints import remember, remembered, weights_key
from . import CONFIG_FILE, HF_CONFIG_FILE, HF_CONFIG_KEY
from .encoder import OpenClipEncoder, weights_fingerprint

WEIGHTS_PATTERNS = ("*.safetensors", "*.bin", "*.pth", "*.pt")  # what open_clip takes for weights in a local-dir


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when the endpoint huggingface_hub downloads from answers (HF_ENDPOINT: a mirror, else huggingface.co),
    asked through huggingface_hub's own HTTP client, so its proxy settings apply (HTTPS_PROXY, HTTP_PROXY, NO_PROXY):
    a check that takes another road could block a download that would work. Any HTTP answer counts (a mirror may
    answer 404 at its root); HF_HUB_OFFLINE means no. The hub client itself retries for ~50 s before giving up."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # the client's connect, proxy, TLS and timeout errors (its HTTP library varies by version)
        return False


def hub_endpoint() -> str:
    """Where downloads come from: HF_ENDPOINT, else huggingface.co."""
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def _hub_offline_if_unreachable(needs_hub: bool):
    """Without a network, let huggingface_hub serve only its local cache, so a missing download fails at once."""
    if not needs_hub or _hub_reachable():
        yield False
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _hub_cache_only():
    """huggingface_hub answers from its local cache without a request (a cached file's path costs no network)."""
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def local_folder(spec: EncoderSpec) -> Path | None:
    """The folder of a `local-dir:` spec; None for other specs."""
    return Path(spec.model[len(LOCAL_DIR_PREFIX):]) if spec.model.startswith(LOCAL_DIR_PREFIX) else None


def hub_repo(spec: EncoderSpec) -> str | None:
    """ORG/REPO of an `hf-hub:` spec; None for other specs."""
    return spec.model[len(HF_HUB_PREFIX):] if spec.model.startswith(HF_HUB_PREFIX) else None


def _weights_files(spec: EncoderSpec) -> list[str] | None:
    """The files open_clip builds `spec`'s weights from, found the way open_clip finds them but never downloading;
    None for random weights or when they cannot be told (then the fingerprint is computed, not looked up)."""
    from open_clip import factory, pretrained as published

    try:
        folder, repo = local_folder(spec), hub_repo(spec)
        if folder is not None:
            checkpoint = factory._find_checkpoint_in_dir(folder)  # the file open_clip picks among several
            return [str(folder / CONFIG_FILE), checkpoint] if checkpoint else None
        with _hub_cache_only():
            if repo is not None:
                return [published.download_pretrained_from_hf(repo, filename=CONFIG_FILE),
                        published.download_pretrained_from_hf(repo)]
            if spec.pretrained in (None, "none"):
                return None
            if os.path.isfile(spec.pretrained):
                return [spec.pretrained]
            cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
            path = published.download_pretrained(cfg) if cfg.get("hf_hub") else None  # its hub cache file
            return [path] if path else None
    except Exception:  # not downloaded yet, or an open_clip without these helpers
        return None


def cache_key(spec: EncoderSpec) -> str | None:
    """Fingerprint cache key: the weights files' identities, the spec and the versions of the loading code."""
    files = _weights_files(spec)
    names = {**spec.to_dict(), "open_clip": open_clip.__version__, "torch": torch.__version__}
    return weights_key(names, files) if files else None


def _pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_spec(spec: EncoderSpec) -> None:
    """Catch the mistakes open_clip would only warn about (and then run with random weights)."""
    folder = local_folder(spec)
    if folder is not None:
        if not (folder / CONFIG_FILE).is_file():
            raise ModelLoadError(f"model folder {folder} has no {CONFIG_FILE}")
        if not any(any(folder.glob(p)) for p in WEIGHTS_PATTERNS):
            raise ModelLoadError(f"model folder {folder} has no weights file (*.safetensors, *.bin, *.pth)")
        return
    if hub_repo(spec) is not None:
        return
    if spec.model.replace("/", "-") not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip model '{spec.model}' (see open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    known = ", ".join(tags) or "none published"
    if spec.pretrained is None:
        raise ModelLoadError(f"model '{spec.model}' needs --pretrained: a tag ({known}), a checkpoint file, or 'none'")
    if spec.pretrained != "none" and spec.pretrained not in tags and not os.path.isfile(spec.pretrained):
        raise ModelLoadError(f"--pretrained '{spec.pretrained}' is neither an existing file nor a tag of "
                             f"{spec.model} ({known})")


def _apply_precision(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """fp32 as loaded; bf16/fp16 cast the weights; int8 quantises the linear layers dynamically (CPU only)."""
    if precision == "fp32":
        return model
    if precision in ("bf16", "fp16"):
        return model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    if device.type != "cpu":
        raise ModelLoadError("--precision int8 runs on the CPU only; use fp16 or bf16 on a GPU")
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, still the fastest here
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    for module in model.modules():  # open_clip reads the compute dtype from the MLP's weight; it offers this hook
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            module.int8_original_dtype = torch.float32
    return model


def _local_text_tower(spec: EncoderSpec) -> dict:
    """open_clip model overrides for a local-dir whose Hugging Face text tower config is saved in the folder
    (local_dir.py writes it and names it under HF_CONFIG_KEY): the tower is built from that file, not from the hub
    name or path the model config names (which may be offline, or a folder since moved), and not from pretrained
    weights (the folder holds them all)."""
    folder = local_folder(spec)
    if folder is None:
        return {}
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    if config.get(HF_CONFIG_KEY) != HF_CONFIG_FILE or not text_cfg.get("hf_model_name"):
        return {}
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}}


def reparameterizable(model: torch.nn.Module) -> bool:
    """Whether the model has train-time branches to fuse for inference (MobileCLIP2's FastViT: timm's convention)."""
    return any(callable(getattr(module, "reparameterize", None)) for module in model.modules())


def reparameterized(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its train-time branches fused (timm's reparameterize_model, which MobileCLIP2's model card
    applies before inference): the same function, computed faster. In place."""
    from timm.utils import reparameterize_model

    return reparameterize_model(model.eval(), inplace=True)


def build(spec: EncoderSpec, device: str | None = None, batch_size: int = 64,
          precision: str = "fp32", for_training: bool = False) -> tuple[OpenClipEncoder, Callable]:
    """The encoder a spec names and open_clip's training transform for it (random resized crop). For inference
    (not `for_training`) a reparameterisable model (MobileCLIP2) is reparameterised; training needs the branches."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")

    _check_spec(spec)
    pretrained = None if spec.pretrained in (None, "none") else spec.pretrained
    is_tag = pretrained is not None and not os.path.exists(pretrained)
    needs_hub = hub_repo(spec) is not None or is_tag
    key = cache_key(spec)  # before and after loading: weights files that change meanwhile are not remembered
    try:
        with _hub_offline_if_unreachable(needs_hub) as offline:
            model, train_preprocess, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=pretrained, **_local_text_tower(spec))
            tokenizer = open_clip.get_tokenizer(spec.model)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/HF errors alike
        message = str(exc).lower()
        download_failed = any(word in message for word in ("download", "hf hub", "connection", "offline"))
        if needs_hub and (offline or download_failed):
            raise ModelLoadError(
                f"cannot download weights for {spec} (no connection to {hub_endpoint()}); pass a local checkpoint with "
                f"--pretrained /path/to/weights.safetensors or a folder with --model {LOCAL_DIR_PREFIX}/path/to/folder"
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {spec}: {first_line}") from None
    if key is not None and key != cache_key(spec):
        key = None
    known = remembered(key)  # what earlier loads of these very files measured
    target = _pick_device(device)
    fingerprint = None  # of the weights as published, so before any reparameterisation or quantisation
    reparameterize = not for_training and reparameterizable(model)
    if precision != "fp32" or reparameterize:
        fingerprint = known.get("fingerprint") or weights_fingerprint(model)
    if reparameterize:
        model = reparameterized(model)
    model = _apply_precision(model.to(target), precision, target)
    encoder = OpenClipEncoder(spec, model, preprocess, tokenizer, target, batch_size, precision, known.get("dim"))
    encoder.reparameterized = reparameterize
    if fingerprint is not None:
        encoder.fingerprint_is(fingerprint)
    elif key is not None:
        encoder.loaded_from(key)
    measured = {"dim": encoder.dim, **({"fingerprint": fingerprint} if fingerprint else {})}
    if key is not None and any(known.get(name) != value for name, value in measured.items()):
        remember(key, str(spec), **measured)
    return encoder, train_preprocess


def load_open_clip(spec: EncoderSpec, device: str | None = None, batch_size: int = 64,
                   precision: str = "fp32") -> OpenClipEncoder:
    """The family's loader in search.encoders' registry: an inference encoder for `spec`."""
    return build(spec, device, batch_size, precision)[0]
