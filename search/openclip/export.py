"""Exporting an open_clip model's towers to ONNX (torch's exporter), for search/onnxrt/.

`export_model(spec)` loads the model with torch, exports the image tower (any batch) and the text tower (any batch;
any length for a causal CLIP text tower, so padding is never computed), checks the graphs against torch, and writes
the folder search/onnxrt/exports.py describes. What the torch-free path could not reproduce exactly (a tokenizer other
than CLIP's BPE, an image transform the pixel recipe lacks, a graph that disagrees) is recorded as unsupported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import swap_into_place
from ..clip_tokenizer import VOCAB_FILE, ClipTokenizer, open_clip_vocab_path
from ..encoders import EncoderSpec, normalised
from ..errors import ModelLoadError
from ..fingerprints import file_identity
from ..onnxrt import tower_file
from ..onnxrt.exports import Export, folder_for
from .encoder import OpenClipEncoder, _can_trim_text, encode_text_prefix, trimmed
from .loading import _weights_files, build
from .recipe import pixel_recipe

log = logging.getLogger(__name__)

MIN_COSINE = 0.99999  # exported graph against torch, fp32
TOKENIZER_PROBES = ("a photo of a dog", "", "Two DOGS, 3 cats & a bird's nest!", "café “quoted” 東京の写真 🙂",
                    "word " * 100)


class _ImageTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.encode_image(pixels)


class _TextTower(torch.nn.Module):
    def __init__(self, model, any_length: bool):
        super().__init__()
        self.model, self.any_length = model, any_length

    def forward(self, tokens):
        return encode_text_prefix(self.model, tokens) if self.any_length else self.model.encode_text(tokens)


def _tokenizer_problem(encoder: OpenClipEncoder) -> str | None:
    """None when our torch-free tokenizer gives open_clip's ids for this model; else why not."""
    vocab = open_clip_vocab_path()
    context = getattr(encoder.tokenizer, "context_length", None)
    if type(encoder.tokenizer).__name__ != "SimpleTokenizer" or vocab is None or not context:
        return f"its tokenizer ({type(encoder.tokenizer).__name__}) is not CLIP's BPE tokenizer"
    ours = ClipTokenizer(vocab, context)(list(TOKENIZER_PROBES))
    if not np.array_equal(ours, encoder.tokenizer(list(TOKENIZER_PROBES)).numpy()):
        return "its tokenizer gives other token ids than CLIP's BPE tokenizer"
    return None


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, axes: dict) -> None:
    """torch's (dynamo) exporter; `axes` maps each dynamic axis of the input to (name, largest size). The weights go
    to NAME.onnx.data: a graph with external weights loads 4x faster, with half the memory (no protobuf copy of the
    weights), and may pass protobuf's 2 GB limit."""
    argument = "pixels" if isinstance(module, _ImageTower) else "tokens"  # the forward()'s parameter name
    dims = {axis: torch.export.Dim(name, max=limit) for axis, (name, limit) in axes.items()}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["input"], output_names=["output"],
                          dynamic_shapes={argument: dims}, external_data=True, optimize=True)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((normalised(a) * normalised(b)).sum(1).min())


def _graph_problem(folder: Path, encoder: OpenClipEncoder, pixels: torch.Tensor, tokens: torch.Tensor,
                   any_length: bool) -> str | None:
    import onnxruntime as ort

    model = encoder.model
    with torch.inference_mode():
        expected = {"image": model.encode_image(pixels).float().numpy(), "text": model.encode_text(tokens).float().numpy()}
    if any_length:
        tokens = trimmed(tokens)
    inputs = {"image": pixels.numpy(), "text": tokens.numpy()}
    for tower in ("image", "text"):
        session = ort.InferenceSession(str(folder / tower_file(tower, "fp32")), providers=["CPUExecutionProvider"])
        cosine = _cosine(session.run(None, {"input": inputs[tower]})[0], expected[tower])
        if cosine < MIN_COSINE:
            return f"the exported {tower} tower differs from torch's (cosine {cosine:.6f} < {MIN_COSINE})"
    return None


def export_model(spec: EncoderSpec) -> Export:
    """Export `spec` into the cache (replacing a stale export of it) and return it; unsupported models are returned
    (and remembered) with the reason. Raises ModelLoadError when the model cannot be loaded or has no weights files."""
    files = _weights_files(spec)
    if not files:
        raise ModelLoadError(f"{spec} has no weights files to export (random weights? save them with a local-dir "
                             f"folder first)")
    sources = tuple(tuple(file_identity(f) or ()) for f in files)
    encoder = build(spec, device="cpu")[0]
    folder = folder_for(spec, encoder.fingerprint)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    recipe = pixel_recipe(encoder.preprocess)
    problem = _tokenizer_problem(encoder) or (None if recipe else "its image transform has a step the torch-free "
                                                                  "preprocessing does not reproduce exactly")
    any_length = _can_trim_text(encoder.model)
    described = Export(folder, spec, sources, encoder.fingerprint, encoder.dim, encoder.image_size,
                       recipe.to_json() if recipe else {}, {}, any_length, problem)
    try:
        if problem is None:
            try:
                described = _export_towers(tmp, encoder, recipe, described)
            except MemoryError:  # this machine, not the model: not remembered
                raise
            except Exception as exc:  # an architecture the exporter cannot trace: remembered, auto then runs torch
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                described = dataclasses.replace(described, unsupported=f"torch's ONNX exporter failed: {reason}")
        dataclasses.replace(described, folder=tmp).write()
        if any(tuple(file_identity(f) or ()) != s for f, s in zip(files, sources)):
            raise ModelLoadError(f"the weights files of {spec} changed while they were exported; try again")
        swap_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s%s", spec, folder, f" (unsupported: {described.unsupported})"
             if described.unsupported else "")
    return Export.read(folder) or described


def _export_towers(tmp: Path, encoder: OpenClipEncoder, recipe, described: Export) -> Export:
    context = encoder.tokenizer.context_length
    shape = recipe.apply(Image.new("RGB", (64, 48))).shape  # what the model takes, as the recipe makes it
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32))
    tokens = encoder.tokenizer(["a photo of a dog on a beach", "two cats"])
    model = encoder.model.float().eval()
    _export(_ImageTower(model), pixels, tmp / tower_file("image", "fp32"), {0: ("batch", 4096)})
    text_axes = {0: ("batch", 4096), **({1: ("length", context)} if described.text_trim else {})}
    _export(_TextTower(model, described.text_trim), tokens[:, :9] if described.text_trim else tokens,
            tmp / tower_file("text", "fp32"), text_axes)
    shutil.copyfile(open_clip_vocab_path(), tmp / VOCAB_FILE)
    tokenizer = {"kind": "clip_bpe", "vocab": VOCAB_FILE, "context_length": context}
    problem = _graph_problem(tmp, encoder, pixels, tokens, described.text_trim)
    return dataclasses.replace(described, tokenizer=tokenizer, unsupported=problem)

