"""What every command-line entry point shares: the argument parser, model arguments, logging set-up and turning
EngineErrors into a one-line message on stderr with a non-zero exit code.

Imports nothing heavy (no torch, no open_clip): the CLIs check their arguments before they load a model.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from .encoders import DEFAULT_MODEL, DEFAULT_PRETRAINED, HF_HUB_PREFIX, LOCAL_DIR_PREFIX, PRECISIONS, RUNTIMES
from .errors import EngineError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# the installed console scripts (pyproject.toml [project.scripts]) and the `python -m` form each one stands for
CONSOLE_SCRIPTS = {"retrieval-index": "python -m indexer", "retrieval-search": "python -m search",
                   "retrieval-web": "python -m web"}


class CliParser(argparse.ArgumentParser):
    """argparse with the project's convention for bad input: usage errors too are one line `error: ...` on stderr
    and exit status 1 (argparse's own are the usage text and status 2). Subcommand parsers inherit the class."""

    def __init__(self, *args, prog: str | None = None, **kwargs):
        script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
        if prog is not None and CONSOLE_SCRIPTS.get(script) == prog:
            prog = script  # help and errors name the command the user typed
        super().__init__(*args, prog=prog, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def add_model_args(parser: argparse.ArgumentParser, default_from_index: bool = False) -> None:
    where = "the model the index was built with" if default_from_index else f"{DEFAULT_MODEL}"
    parser.add_argument("--model", default=None,
                        help=f"open_clip model name, {LOCAL_DIR_PREFIX}PATH or {HF_HUB_PREFIX}ORG/REPO "
                             f"(default: {where})")
    parser.add_argument("--pretrained", default=None,
                        help=f"open_clip pretrained tag, checkpoint file, or 'none' for random weights "
                             f"(default for {DEFAULT_MODEL}: {DEFAULT_PRETRAINED})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="weights format for encoding: int8 = dynamic quantisation of linear layers, fastest on "
                             "CPU; bf16/fp16 for GPUs (default: fp32)")
    add_runtime_arg(parser)


def add_runtime_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES,
                        help="onnx: ONNX Runtime, no torch in the process (the model is exported once and cached); "
                             "torch: open_clip on torch; auto: onnx on the CPU when the model can be exported, else "
                             "torch (default: auto)")


def _own_records(record: logging.LogRecord) -> bool:
    """Keep our loggers' records; libraries (open_clip logs on the root logger, huggingface_hub, httpx) explain
    failures that we already report as one line of our own."""
    return record.name.split(".")[0] in ("search", "indexer", "web", "demo", "__main__")


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging, run; EngineError → 'error: ...' on stderr and exit 1, Ctrl-C → exit 130."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_own_records)
    try:
        return main(args) or 0
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
