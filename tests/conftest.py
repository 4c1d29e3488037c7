"""Shared fixtures: tiny open_clip models written as local-dir folders, loaded through the real code path."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from search.encoders import EncoderSpec, create_encoder
from search.openclip.local_dir import init_local_dir, save_local_dir

from .helpers import TINY_MODEL_CFG, draw, make_pairs


_CACHE = tempfile.mkdtemp(prefix="image-search-test-cache-")


def pytest_configure(config):
    """Caches (weights fingerprints, ONNX exports) live in a folder of the test session, shared with the processes
    tests start, and never in the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Randomly initialised tiny CLIP (32-d embeddings, 32 px images) as a local-dir folder."""
    return init_local_dir(TINY_MODEL_CFG, tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_spec(tiny_model_dir):
    return f"local-dir:{tiny_model_dir}"


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_spec):
    return create_encoder(EncoderSpec.from_args(tiny_model_spec, None), "torch")


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, tiny_model_spec):
    """The tiny model trained contrastively to memorise 50 generated pairs: a model with real signal."""
    encoder = create_encoder(EncoderSpec.from_args(tiny_model_spec, None), "torch")
    pairs = make_pairs(50, seed=1)
    pixels = torch.from_numpy(np.stack([encoder.preprocess_image(draw(*p[2])) for p in pairs]))
    tokens = encoder.tokenizer([p[1][0] for p in pairs])
    model = encoder.model.train()
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        image_features, text_features, scale = model(pixels, tokens)[:3]
        logits = scale * image_features @ text_features.T
        labels = torch.arange(len(pairs))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    return save_local_dir(encoder, tmp_path_factory.mktemp("trained_model"), TINY_MODEL_CFG)
