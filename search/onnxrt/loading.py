"""Loading the ONNX Runtime encoder for a spec, and the `--runtime auto` choice between it and torch."""
from __future__ import annotations

import importlib.util
import os

from ..encoders import LOCAL_DIR_PREFIX, EncoderSpec
from ..errors import ModelLoadError
from . import ONNX_PRECISIONS
from .encoder import OnnxEncoder
from .exports import ensure_export
from .quantize import ensure_int8

GPU_DEVICE_FILE = "/dev/nvidia0"  # a visible NVIDIA GPU: torch (CUDA) is then the faster runtime


def onnx_unsuited(spec: EncoderSpec, device: str | None = None, precision: str = "fp32") -> str | None:
    """Why `--runtime auto` should not try ONNX Runtime for this load (None: try it). Costs no import."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    if device not in (None, "cpu") or (device is None and os.path.exists(GPU_DEVICE_FILE)):
        return "a GPU is used"
    if precision not in ONNX_PRECISIONS:
        return f"precision {precision}"
    if spec.family != "open_clip":
        return f"family {spec.family}"
    if spec.pretrained == "none" and not spec.model.startswith(LOCAL_DIR_PREFIX):
        return "random weights are not exported"
    return None


def load_onnx(spec: EncoderSpec, device: str | None = None, batch_size: int = 64,
              precision: str = "fp32") -> OnnxEncoder:
    """The registry's loader for the ONNX runtime (search.encoders.LOADERS['onnx']): exports the model on first use."""
    if device not in (None, "cpu"):
        raise ModelLoadError(f"--runtime onnx runs on the CPU; use --runtime torch for --device {device}")
    if precision not in ONNX_PRECISIONS:
        raise ModelLoadError(f"--runtime onnx runs fp32 or int8, not {precision}; use --runtime torch for it")
    export = ensure_export(spec)
    if precision == "int8":
        ensure_int8(export)
    return OnnxEncoder(export, precision, batch_size)
