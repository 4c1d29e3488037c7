"""The one encoder interface and the registry that builds encoders from a spec.

Everything outside the encoder implementations talks to models through `Encoder`; only the implementation modules
import a model library. An `EncoderSpec` names a model fully enough to rebuild it, and is what index manifests store.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
LOCAL_DIR_PREFIX = "local-dir:"  # --model local-dir:FOLDER, a model folder (open_clip's spelling)
HF_HUB_PREFIX = "hf-hub:"  # --model hf-hub:ORG/REPO, a model on the Hugging Face hub (open_clip's spelling)
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # weights formats an encoder can run in; fp32 is the default


@dataclass(frozen=True)
class EncoderSpec:
    """Identity of a model: implementation family, model name and pretrained weights tag or file (None = in folder).

    Paths inside a spec are absolute so that an index remembers exactly which weights it was built with.
    """

    family: str = "open_clip"
    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED

    @classmethod
    def from_args(cls, model: str | None, pretrained: str | None, family: str = "open_clip") -> "EncoderSpec":
        """Normalise CLI-style arguments: local paths become absolute, 'none' means random initialisation."""
        model = model or DEFAULT_MODEL
        if model.startswith(LOCAL_DIR_PREFIX):
            folder = Path(model[len(LOCAL_DIR_PREFIX):]).expanduser()
            return cls(family, LOCAL_DIR_PREFIX + str(folder.resolve()), None)
        if pretrained is None:
            pretrained = DEFAULT_PRETRAINED if model == DEFAULT_MODEL else None
        if pretrained is not None and pretrained.lower() == "none":
            pretrained = "none"
        elif pretrained is not None and Path(pretrained).expanduser().exists():
            pretrained = str(Path(pretrained).expanduser().resolve())
        return cls(family, model, pretrained)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderSpec":
        return cls(data.get("family", "open_clip"), data["model"], data.get("pretrained"))

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.model if self.pretrained is None else f"{self.model} ({self.pretrained})"


class Encoder(abc.ABC):
    """A dual encoder mapping images and texts into one space.

    Contract: `encode_images` and `encode_texts` return L2-normalised float32 arrays of shape [N, dim], row i for
    input i, and an empty [0, dim] array for empty input. `preprocess_image` + `encode_pixels` split image encoding so
    callers can preprocess in worker threads; `encode_images` is the two joined.
    """

    spec: EncoderSpec
    dim: int
    image_size: int | None = None  # side of the model's square input, when it has one
    precision: str = "fp32"  # numeric format of the weights at inference: fp32, bf16, fp16 or int8
    runtime: str = "torch"  # what runs the model: torch or onnx (RUNTIMES)
    # whether idle worker threads may spin-wait between calls (ONNX Runtime honours it before its first call; torch
    # ignores it): fastest for one command-line query; a server sets False, since spinning threads take the cores
    # its other work (FAISS, SQLite, other requests) needs
    spin: bool = True

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Short stable hash of the weights: two encoders with equal fingerprints embed identically."""

    @abc.abstractmethod
    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image → the model's input array (thread-safe, no model call)."""

    @abc.abstractmethod
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """A stacked batch of `preprocess_image` outputs → normalised embeddings."""

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → normalised embeddings."""

    def image_preprocessor(self) -> Callable[[Image.Image], np.ndarray]:
        """`preprocess_image` as a picklable function that holds no model, for worker processes (Ray tasks)."""
        raise NotImplementedError(f"{type(self).__name__} cannot preprocess in another process")

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(np.stack([self.preprocess_image(im) for im in images]))


def normalised(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32, as the Encoder contract promises (zero rows stay zero)."""
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))


def _load_open_clip(spec: EncoderSpec, **options) -> Encoder:
    from .openclip.loading import load_open_clip  # imported when a model is built: torch and open_clip take seconds

    return load_open_clip(spec, **options)


def _load_onnx(spec: EncoderSpec, **options) -> Encoder:
    from .onnxrt.loading import load_onnx  # no torch: an open_clip model exported once, run by ONNX Runtime

    return load_onnx(spec, **options)


# family → loader: (EncoderSpec, device=, batch_size=, precision=) → Encoder, ModelLoadError on any failure.
# "onnx" runs open_clip models (spec.family "open_clip") exported to ONNX: the spec stays the model's identity.
LOADERS: dict[str, Callable[..., Encoder]] = {"open_clip": _load_open_clip, "onnx": _load_onnx}
RUNTIMES = ("auto", "torch", "onnx")  # torch = the spec's own family; auto = onnx on the CPU when it can be made


def create_encoder(spec: EncoderSpec, runtime: str = "auto", **options: Any) -> Encoder:
    """Build the encoder a spec names, on `runtime`. Raises ModelLoadError with a one-line reason on any failure.

    auto: ONNX Runtime on the CPU when the model is exported (or can be, once: a few seconds), else torch; a model
    that cannot be exported falls back to torch, with the reason logged."""
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime '{runtime}' (choose {', '.join(RUNTIMES)})")
    if runtime == "auto":
        from .onnxrt.loading import onnx_unsuited

        unsuited = onnx_unsuited(spec, options.get("device"), options.get("precision", "fp32"))
        if unsuited is None:
            try:
                return LOADERS["onnx"](spec, **options)
            except ModelLoadError as exc:
                log.info("running %s on torch: %s", spec, exc)
    elif runtime == "onnx":
        return LOADERS["onnx"](spec, **options)
    if spec.family not in LOADERS:
        raise ModelLoadError(f"unknown encoder family '{spec.family}' (known: {', '.join(sorted(LOADERS))})")
    return LOADERS[spec.family](spec, **options)
