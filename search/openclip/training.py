"""`ClipTask`: everything fine-tuning does to an open_clip model, in the spirit of open_clip's training tasks.

The trainer (indexer/finetune.py) holds the optimisation loop, the schedule and the checkpoints; it reaches the model
only through this wrapper: forward features and the contrastive loss, locked towers, the temperature clamp,
train/eval mode, the parameter groups for the optimizer, the state dict, saving as a local-dir folder. Validation
encodes through `task.encoder`, the inference `Encoder` over the same weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..encoders import EncoderSpec
from .encoder import OpenClipEncoder
from .loading import build
from .local_dir import save_local_dir

MAX_LOGIT_SCALE = float(np.log(100))  # open_clip's training keeps the learnable temperature at most 100
NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale")  # with 1-d tensors: no weight decay (open_clip's convention)


class ClipTask:
    def __init__(self, encoder: OpenClipEncoder, train_transform: Callable[[Image.Image], torch.Tensor]):
        self.encoder = encoder
        self.train_transform = train_transform
        self._model = encoder.model

    @classmethod
    def load(cls, spec: EncoderSpec, device: str | None = None) -> "ClipTask":
        """The model `spec` names (fp32, not reparameterised), ready to train; ModelLoadError as for inference."""
        return cls(*build(spec, device, for_training=True))

    @property
    def spec(self) -> EncoderSpec:
        return self.encoder.spec

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    # -- data ---------------------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.tokenize(texts)

    # -- one step -----------------------------------------------------------------------------------------------------

    def train(self) -> None:
        self._model.train()

    def eval(self) -> None:
        self._model.eval()

    def forward_features(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple:
        """Differentiable (image features, text features, logit scale[, logit bias]), features normalised: the
        arguments `contrastive_loss()` takes; the bias only for a model that has one (SigLIP's sigmoid loss).
        CoCa's captioning logits are not used: it is fine-tuned with its contrastive loss only."""
        self.encoder.weights_changed()  # weights are about to change
        out = self._model(pixels.to(self.device), tokens.to(self.device))
        if isinstance(out, dict):
            features = out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
        else:
            features = out[0], out[1], out[2], out[3] if len(out) > 3 else None
        return features if self.uses_logit_bias() else features[:3]

    def uses_logit_bias(self) -> bool:
        """SigLIP-family models (a learnt logit bias) train with the sigmoid loss."""
        return getattr(self._model, "logit_bias", None) is not None

    def contrastive_loss(self) -> Callable:
        """loss(*forward_features(...)) → scalar tensor: SigLIP's sigmoid loss for a model with a logit bias, else
        CLIP's symmetric InfoNCE (open_clip's own losses)."""
        from open_clip.loss import ClipLoss, SigLipLoss

        return SigLipLoss() if self.uses_logit_bias() else ClipLoss()

    def clamp_logit_scale(self) -> None:
        """After each optimizer step, as open_clip's training does."""
        with torch.no_grad():
            self._model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # -- what is trained ----------------------------------------------------------------------------------------------

    def lock_towers(self, image: bool, text: bool) -> None:
        if image:
            self._model.lock_image_tower()
        if text:
            self._model.lock_text_tower()

    def trains_a_tower(self) -> bool:
        """Whether anything but the temperature is left to train (the temperature alone changes no ranking)."""
        return any(p.requires_grad for n, p in self._model.named_parameters() if not n.startswith("logit_"))

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The trainable parameters as optimizer groups: no weight decay on gains, biases, embeddings and the
        temperature (open_clip's convention), `weight_decay` on the rest."""
        decay, no_decay = [], []
        for name, param in self._model.named_parameters():
            if not param.requires_grad:
                continue
            flat = param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)
            (no_decay if flat else decay).append(param)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]

    # -- state --------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self._model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.encoder.weights_changed()
        self._model.load_state_dict(state)

    def save(self, folder: Path) -> Path:
        """The current weights as a local-dir folder with the config the model was built from."""
        return save_local_dir(self.encoder, folder)
