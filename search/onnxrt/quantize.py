"""The int8 variant of exported towers: ONNX Runtime's dynamic quantisation (int8 weights, activations quantised per
batch), made once per export on first use and kept beside the fp32 files. Needs the `onnx` package, not torch."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ..errors import ModelLoadError
from . import TOWERS
from .exports import Export

log = logging.getLogger(__name__)


def ensure_int8(export: Export) -> None:
    """Write image.int8.onnx and text.int8.onnx (each with its weights file) into the export folder unless they are
    there; a reader sees no graph or a whole one. Raises ModelLoadError when ONNX Runtime's quantisation tools are
    missing."""
    missing = [tower for tower in TOWERS if not export.path(tower, "int8").is_file()]
    if not missing:
        return
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ModelLoadError(f"--precision int8 on ONNX Runtime needs the onnx package ({exc})") from None
    log.info("quantising %s to int8 (once)", export.spec)
    tmp = Path(tempfile.mkdtemp(prefix=".int8-", dir=export.folder))
    try:
        for tower in missing:
            target = export.path(tower, "int8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(export.path(tower)), str(tmp / target.name), weight_type=QuantType.QInt8,
                                 per_channel=True, use_external_data_format=True)
            # the graph names its weights file: move that first, then the graph (readers look for the graph)
            for made in sorted(tmp.iterdir(), key=lambda f: f.name == target.name):
                os.replace(made, export.folder / made.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
