"""`OnnxEncoder`: the inference `Encoder` over an exported open_clip model, on ONNX Runtime with numpy/PIL
preprocessing and the torch-free CLIP tokenizer. Imports neither torch nor open_clip.

Each tower gets its session on first use (a text query never loads the image tower); sessions use every CPU this
process may run on and all of ONNX Runtime's graph optimisations.
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

import numpy as np
from PIL import Image

from ..clip_tokenizer import ClipTokenizer
from ..encoders import Encoder, normalised
from ..errors import ModelLoadError
from ..pixels import PixelRecipe
from . import ONNX_PRECISIONS, TOWERS
from .exports import Export


# images per session run: as fast as 64 on a CPU (measured: ViT-B-32-256, 2 cores, 31.7 vs 29.0 images/s) with a
# third of the activation memory (a 512-photo build peaks at 0.86 GB instead of 1.5 GB)
IMAGE_RUN_BATCH = 16


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class OnnxEncoder(Encoder):
    runtime = "onnx"

    def __init__(self, export: Export, precision: str = "fp32", batch_size: int = 64, threads: int | None = None):
        if precision not in ONNX_PRECISIONS:
            raise ModelLoadError(f"ONNX Runtime runs fp32 or int8, not {precision}; use --runtime torch for it")
        self.export = export
        self.spec = export.spec
        self.dim = export.dim
        self.image_size = export.image_size
        self.precision = precision
        self.batch_size = batch_size
        self.threads = threads or cpu_count()
        self.spin = True  # ONNX Runtime's idle threads spin-wait (fastest when this process has the cores to itself)
        self.recipe = PixelRecipe.from_json(export.pixels)
        self._sessions: dict[str, object] = {}
        self._tokenizer: ClipTokenizer | None = None
        self._lock = threading.Lock()  # sessions and the tokenizer are made once, whichever thread asks first

    @property
    def fingerprint(self) -> str:
        return self.export.fingerprint  # measured at export; the export is valid only while its weights files are

    def session(self, tower: str):
        """The ONNX Runtime session of `tower` ('image' or 'text'), created on first use."""
        if tower not in TOWERS:
            raise ValueError(tower)
        with self._lock:
            if tower not in self._sessions:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = self.threads
                if not self.spin:  # idle threads sleep instead of spinning: the cores go to other processes
                    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                options.log_severity_level = 3  # errors only: its warnings are about its own graph rewrites
                try:
                    self._sessions[tower] = ort.InferenceSession(str(self.export.path(tower, self.precision)),
                                                                 options, providers=["CPUExecutionProvider"])
                except Exception as exc:  # a damaged cache file: say which, so it can be deleted
                    raise ModelLoadError(f"cannot load {self.export.path(tower, self.precision)}: "
                                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None
            return self._sessions[tower]

    @property
    def tokenizer(self) -> ClipTokenizer:
        with self._lock:
            if self._tokenizer is None:
                info = self.export.tokenizer
                self._tokenizer = ClipTokenizer(self.export.folder / info["vocab"], int(info["context_length"]))
            return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(list(texts))

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        return self.recipe.apply(image)

    def image_preprocessor(self):
        return self.recipe.apply  # a frozen dataclass's method: pickles without the sessions

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        session = self.session("image")
        step = min(self.batch_size, IMAGE_RUN_BATCH)
        out = [session.run(None, {"input": np.ascontiguousarray(pixels[start:start + step], dtype=np.float32)})[0]
               for start in range(0, len(pixels), step)]
        return normalised(np.concatenate(out))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        session = self.session("text")
        tokens = self.tokenize(texts)
        lengths = (tokens != 0).cumsum(axis=1).argmax(axis=1) + 1  # up to and including each text's last token
        # batches of similar lengths: a graph that takes any length then computes (almost) no padding
        order = np.argsort(lengths, kind="stable") if self.export.text_trim else np.arange(len(texts))
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = tokens[rows, :int(lengths[rows].max())] if self.export.text_trim else tokens[rows]
            out[rows] = session.run(None, {"input": batch})[0]
        return normalised(out)
