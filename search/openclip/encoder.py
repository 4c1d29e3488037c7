"""`OpenClipEncoder`: the `Encoder` (inference) over an open_clip model, with open_clip's own preprocessing and
tokenizer. Built by loading.py; fine-tuning reaches the same model through training.py's `ClipTask`."""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..encoders import Encoder, EncoderSpec
from ..fingerprints import remember, remembered
from .recipe import pixel_recipe


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_state(model: torch.nn.Module) -> tuple:
    """Changes when a weight tensor is replaced or written in place (torch counts in-place writes per tensor)."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def _can_trim_text(model) -> bool:
    """Trimming padding is exact only for a causal text tower pooled at the end-of-text token (CLIP's): no position
    then sees the padding after it. Other towers (HF text models, SigLIP's last-token pooling) run at full length."""
    return (getattr(model, "text_pool_type", None) in ("argmax", "eos") and getattr(model, "attn_mask", None) is not None
            and hasattr(model, "token_embedding") and hasattr(model, "positional_embedding"))


def _encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text run only up to the batch's longest real sequence (padding id 0)."""
    return encode_text_prefix(model, trimmed(tokens))


def trimmed(tokens: torch.Tensor) -> torch.Tensor:
    """The batch cut after its longest real sequence (padding id 0)."""
    length = int((tokens != 0).int().cumsum(dim=1).argmax(dim=1).max()) + 1  # last non-padding position + 1
    return tokens[:, :length]


def encode_text_prefix(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the first tokens.shape[1] positions of a causal text tower (what ONNX export
    traces: the length is read from the input's shape, so the exported graph takes any length)."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


class _TorchPreprocess:
    """open_clip's own transform → numpy, picklable (for a transform PixelRecipe cannot reproduce)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.transform(image).numpy()


class OpenClipEncoder(Encoder):
    reparameterized = False  # train-time branches fused for inference (loading.build: MobileCLIP2)

    def __init__(self, spec: EncoderSpec, model, preprocess, tokenizer, device: torch.device, batch_size: int = 64,
                 precision: str = "fp32", dim: int | None = None):
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.model = model.to(device).eval()
        self.trim_text = _can_trim_text(self.model)
        # open_clip's transform in numpy/PIL, bit-identical and off torch's threads (None: a step it lacks → torch)
        self.recipe = pixel_recipe(preprocess)
        size = getattr(self.model.visual, "image_size", None)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size else None
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._fingerprint: str | None = None
        self._loaded_from: tuple | None = None  # (fingerprint cache key, tensor_state at load)
        self.dim = 0  # towers differ in where they keep the width: ask the model once (or the fingerprint cache)
        self.dim = dim or int(self.encode_texts(["a photo"]).shape[1])

    # -- the weights fingerprint, remembered per weights file (search/fingerprints.py) ------------------------------

    def loaded_from(self, key: str) -> None:
        """The weights are exactly those of the files behind fingerprint cache key `key` (until written)."""
        self._loaded_from = (key, tensor_state(self.model))

    def fingerprint_is(self, fingerprint: str) -> None:
        """Known already (of the fp32 weights a lower precision was made from)."""
        self._fingerprint = fingerprint

    def weights_changed(self) -> None:
        """The weights are being written (training): measure the fingerprint again when next asked."""
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # hashing ViT-B-32 takes about a second: only when asked, once per file
            key = None
            if self._loaded_from is not None and self._loaded_from[1] == tensor_state(self.model):
                key = self._loaded_from[0]  # still exactly the weights loaded from those files
            self._fingerprint = remembered(key).get("fingerprint")
            if self._fingerprint is None:
                self._fingerprint = weights_fingerprint(self.model)
                remember(key, str(self.spec), fingerprint=self._fingerprint)
        return self._fingerprint

    # -- inference ----------------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        if self.recipe is None:
            return self.preprocess(image).numpy()
        return self.recipe.apply(image)

    def image_preprocessor(self):
        return self.recipe.apply if self.recipe is not None else _TorchPreprocess(self.preprocess)

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
