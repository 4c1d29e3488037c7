"""The int8 variant of exported towers: ONNX Runtime's dynamic quantisation (int8 weights, activations quantised per
batch), made once per export on first use and kept beside the fp32 files. Needs the `onnx` package, not torch."""
from __future__ import annotations

import logging
import os
import warnings

from ..errors import ModelLoadError
from . import TOWERS
from .exports import Export

log = logging.getLogger(__name__)


def ensure_int8(export: Export) -> None:
    """Write image.int8.onnx and text.int8.onnx into the export folder unless they are there (atomically: a reader
    sees no file or a whole one). Raises ModelLoadError when ONNX Runtime's quantisation tools are missing."""
    missing = [tower for tower in TOWERS if not export.path(tower, "int8").is_file()]
    if not missing:
        return
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ModelLoadError(f"--precision int8 on ONNX Runtime needs the onnx package ({exc})") from None
    log.info("quantising %s to int8 (once)", export.spec)
    for tower in missing:
        target = export.path(tower, "int8")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(export.path(tower)), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
