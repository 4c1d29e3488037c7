"""`python -m search.openclip export SPEC_JSON`: export a model's towers to ONNX in a process of its own (what
search/onnxrt/exports.py runs, so that the process asking stays torch-free). Prints the export folder."""
import json
import sys

from ..encoders import EncoderSpec
from ..errors import EngineError


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "export":
        print("usage: python -m search.openclip export SPEC_JSON", file=sys.stderr)
        return 1
    from .export import export_model  # after the usage check: it imports torch

    try:
        print(export_model(EncoderSpec.from_dict(json.loads(argv[1]))).folder)
    except (EngineError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
