"""The ONNX Runtime encoder family: open_clip models exported once to ONNX, run without torch or open_clip.

    exports.py   the export cache: where exported towers live, what describes them, finding a valid one
    encoder.py   `OnnxEncoder`, the inference `Encoder` over ONNX Runtime sessions (one per tower, made on first use)
    quantize.py  the int8 variant of each tower (ONNX Runtime's dynamic quantisation), made on first use

Exports are made by search/openclip/export.py (torch's exporter), in a child process when this process has not
imported torch, so a query or a build stays torch-free. This module itself imports nothing heavy.
"""

ONNX_PRECISIONS = ("fp32", "int8")  # what the ONNX towers come in
TOWERS = ("image", "text")
DESCRIPTION_FILE = "encoder.json"  # what an export folder holds and what it was made from


def tower_file(tower: str, precision: str) -> str:
    """File name of one exported tower: image.onnx, text.onnx, image.int8.onnx, text.int8.onnx."""
    return f"{tower}.onnx" if precision == "fp32" else f"{tower}.{precision}.onnx"
