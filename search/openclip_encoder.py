"""open_clip implementation of `Encoder`: the only module of the project that imports open_clip.

Loads built-in names with a pretrained tag or checkpoint file, `local-dir:PATH` folders (open_clip_config.json +
weights) and `hf-hub:ORG/REPO`. Uses open_clip's own preprocessing and tokenizer.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .encoders import LOCAL_DIR_PREFIX, Encoder, EncoderSpec
from .errors import ModelLoadError
from .fingerprints import remember, remembered, weights_key

log = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when the model hub answers a TCP connect; the hub client itself retries for ~50 s before giving up."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


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


def _weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _hub_cache_only():
    """huggingface_hub answers from its local cache without a request (a cached file's path costs no network)."""
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _weights_files(spec: EncoderSpec) -> list[str] | None:
    """The files open_clip builds `spec`'s weights from, found the way open_clip finds them but never downloading;
    None for random weights or when they cannot be told (then the fingerprint is computed, not looked up)."""
    import open_clip
    from open_clip import factory, pretrained as published

    try:
        if spec.model.startswith(LOCAL_DIR_PREFIX):
            folder = Path(spec.model[len(LOCAL_DIR_PREFIX):])
            checkpoint = factory._find_checkpoint_in_dir(folder)  # the file open_clip picks among several
            return [str(folder / LOCAL_DIR_CONFIG), checkpoint] if checkpoint else None
        with _hub_cache_only():
            if spec.model.startswith("hf-hub:"):
                repo = spec.model[len("hf-hub:"):]
                return [published.download_pretrained_from_hf(repo, filename="open_clip_config.json"),
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


def _weights_key(spec: EncoderSpec) -> str | None:
    """Fingerprint cache key: the weights files' identities, the spec and the versions of the loading code."""
    import open_clip

    files = _weights_files(spec)
    names = {**spec.to_dict(), "open_clip": open_clip.__version__, "torch": torch.__version__}
    return weights_key(names, files) if files else None


def _tensor_state(model: torch.nn.Module) -> tuple:
    """Changes when a weight tensor is replaced or written in place (torch counts in-place writes per tensor)."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def _pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_spec(spec: EncoderSpec) -> None:
    """Catch the mistakes open_clip would only warn about (and then run with random weights)."""
    import open_clip

    if spec.model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(spec.model[len(LOCAL_DIR_PREFIX):])
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(f"model folder {folder} has no open_clip_config.json")
        if not any(any(folder.glob(p)) for p in ("*.safetensors", "*.bin", "*.pth", "*.pt")):
            raise ModelLoadError(f"model folder {folder} has no weights file (*.safetensors, *.bin, *.pth)")
        return
    if spec.model.startswith("hf-hub:"):
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


PRECISIONS = ("fp32", "bf16", "fp16", "int8")


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


def load_open_clip(spec: EncoderSpec, device: str | None = None, batch_size: int = 64,
                   precision: str = "fp32") -> "OpenClipEncoder":
    """Build an encoder from a spec; every failure becomes a one-line ModelLoadError."""
    import open_clip

    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")

    _check_spec(spec)
    pretrained = None if spec.pretrained in (None, "none") else spec.pretrained
    is_tag = pretrained is not None and not os.path.exists(pretrained)
    needs_hub = spec.model.startswith("hf-hub:") or is_tag
    key = _weights_key(spec)  # before and after loading: weights files that change meanwhile are not remembered
    try:
        with _hub_offline_if_unreachable(needs_hub) as offline:
            model, train_preprocess, preprocess = open_clip.create_model_and_transforms(spec.model,
                                                                                        pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(spec.model)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/HF errors alike
        message = str(exc).lower()
        download_failed = any(word in message for word in ("download", "hf hub", "connection", "offline"))
        if needs_hub and (offline or download_failed):
            raise ModelLoadError(
                f"cannot download weights for {spec} (no connection to {HUB_HOST}); pass a local checkpoint with "
                f"--pretrained /path/to/weights.safetensors or a folder with --model local-dir:/path/to/folder"
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {spec}: {first_line}") from None
    if key is not None and key != _weights_key(spec):
        key = None
    known = remembered(key)  # what earlier loads of these very files measured
    target = _pick_device(device)
    fingerprint = None  # of the weights as published, so before any quantisation
    if precision != "fp32":
        fingerprint = known.get("fingerprint") or _weights_fingerprint(model)
    model = _apply_precision(model.to(target), precision, target)
    encoder = OpenClipEncoder(spec, model, preprocess, tokenizer, target, batch_size, precision, known.get("dim"))
    encoder.train_preprocess = train_preprocess
    if fingerprint is not None:
        encoder._fingerprint = fingerprint
    elif key is not None:
        encoder._loaded_from = (key, _tensor_state(encoder.model))
    measured = {"dim": encoder.dim, **({"fingerprint": fingerprint} if fingerprint else {})}
    if key is not None and any(known.get(name) != value for name, value in measured.items()):
        remember(key, str(spec), **measured)
    return encoder


def _split_tensor_tail(preprocess):
    """(PIL transforms, mean, std) when `preprocess` ends in to-tensor + normalise, else None.

    Those two steps on one small image cost more in torch (thread-pool handoffs) than the arithmetic itself; the
    numpy equivalent gives the same values (to float rounding) several times faster, off torch's threads."""
    transforms = list(getattr(preprocess, "transforms", []))
    if len(transforms) < 2 or type(transforms[-1]).__name__ != "Normalize" or \
            type(transforms[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    normalize = transforms[-1]
    shape = (-1, 1, 1)
    return (transforms[:-2], np.asarray(normalize.mean, np.float32).reshape(shape),
            np.asarray(normalize.std, np.float32).reshape(shape))


def _can_trim_text(model) -> bool:
    """Trimming padding is exact only for a causal text tower pooled at the end-of-text token (CLIP's): no position
    then sees the padding after it. Other towers (HF text models, SigLIP's last-token pooling) run at full length."""
    return (getattr(model, "text_pool_type", None) in ("argmax", "eos") and getattr(model, "attn_mask", None) is not None
            and hasattr(model, "token_embedding") and hasattr(model, "positional_embedding"))


def _encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text run only up to the batch's longest real sequence (padding id 0)."""
    from open_clip.transformer import text_global_pool

    length = int((tokens != 0).int().cumsum(dim=1).argmax(dim=1).max()) + 1  # last non-padding position + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


class OpenClipEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, model, preprocess, tokenizer, device: torch.device, batch_size: int = 64,
                 precision: str = "fp32", dim: int | None = None):
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.model = model.to(device).eval()
        self.trim_text = _can_trim_text(self.model)
        self._fast_tail = _split_tensor_tail(preprocess)
        size = getattr(self.model.visual, "image_size", None)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size else None
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._fingerprint: str | None = None
        self.dim = 0  # towers differ in where they keep the width: ask the model once (or the fingerprint cache)
        self.dim = dim or int(self.encode_texts(["a photo"]).shape[1])

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # hashing ViT-B-32 takes about a second: only when asked, once per file
            key = None
            if self._loaded_from is not None and self._loaded_from[1] == _tensor_state(self.model):
                key = self._loaded_from[0]  # still exactly the weights loaded from those files
            self._fingerprint = remembered(key).get("fingerprint")
            if self._fingerprint is None:
                self._fingerprint = _weights_fingerprint(self.model)
                remember(key, str(self.spec), fingerprint=self._fingerprint)
        return self._fingerprint

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        if self._fast_tail is None:
            return self.preprocess(image).numpy()
        head, mean, std = self._fast_tail
        for transform in head:  # open_clip's own resize and crop (PIL)
            image = transform(image)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        return (pixels * np.float32(1 / 255) - mean) / std

    # -- training hooks (used by indexer.finetune; the Encoder interface itself is inference-only) -----------------

    train_preprocess = None  # open_clip's training transform (random resized crop), set by load_open_clip
    _loaded_from: tuple | None = None  # (fingerprint cache key, _tensor_state at load), set by load_open_clip

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def forward_features(self, pixels: torch.Tensor, tokens: torch.Tensor):
        """Differentiable (image features, text features, logit scale), features normalised, as ClipLoss takes."""
        self._fingerprint = None  # weights are about to change
        out = self.model(pixels.to(self.device), tokens.to(self.device))
        if isinstance(out, dict):
            return out["image_features"], out["text_features"], out["logit_scale"]
        return out[0], out[1], out[2]

    def contrastive_loss(self):
        from open_clip.loss import ClipLoss

        return ClipLoss()

    def clamp_logit_scale(self) -> None:
        """Keep the learnable temperature at most 100, as open_clip's training does."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, np.log(100))

    def lock_towers(self, image: bool, text: bool) -> None:
        if image:
            self.model.lock_image_tower()
        if text:
            self.model.lock_text_tower()

    def model_config(self) -> dict:
        """The open_clip model config this model was built from (what a local-dir folder needs to rebuild it)."""
        import json

        import open_clip

        if self.spec.model.startswith(LOCAL_DIR_PREFIX):
            folder = Path(self.spec.model[len(LOCAL_DIR_PREFIX):])
            return json.loads((folder / LOCAL_DIR_CONFIG).read_text(encoding="utf-8"))["model_cfg"]
        if self.spec.model.startswith("hf-hub:"):
            from open_clip.factory import _get_hf_config

            return _get_hf_config(self.spec.model[len("hf-hub:"):])["model_cfg"]
        return open_clip.get_model_config(self.spec.model)

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(pixels), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(pixels[start:start + self.batch_size]))
            batch = batch.to(self.device, self.input_dtype)
            features = self.model.encode_image(batch).float()  # normalise in float32, whatever the weights' dtype
            out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
            features = _encode_text_trimmed(self.model, tokens) if self.trim_text else self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


LOCAL_DIR_CONFIG = "open_clip_config.json"
LOCAL_DIR_WEIGHTS = "open_clip_model.safetensors"


def save_local_dir(encoder: OpenClipEncoder, folder: Path, model_cfg: dict) -> Path:
    """Write `encoder`'s weights as an open_clip local-dir folder (config + safetensors), loadable with
    `--model local-dir:FOLDER`."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    visual = encoder.model.visual
    preprocess_cfg = {"mean": list(visual.image_mean or ()), "std": list(visual.image_std or ())}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {k: v for k, v in preprocess_cfg.items() if v}}
    (folder / LOCAL_DIR_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.model.state_dict().items()}
    save_file(state, str(folder / LOCAL_DIR_WEIGHTS))
    return folder


def init_local_dir(model_cfg: dict, folder: Path, seed: int = 0) -> Path:
    """Create a randomly initialised model from an open_clip model config and save it as a local-dir folder."""
    import json

    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCAL_DIR_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}), encoding="utf-8")
    torch.manual_seed(seed)
    spec = EncoderSpec.from_args(LOCAL_DIR_PREFIX + str(folder), None)
    model, _, preprocess = open_clip.create_model_and_transforms(spec.model)  # no weights yet: random init
    encoder = OpenClipEncoder(spec, model, preprocess, open_clip.get_tokenizer(spec.model), torch.device("cpu"))
    return save_local_dir(encoder, folder, model_cfg)
