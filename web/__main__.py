"""`python -m web --index INDEX [--host 127.0.0.1] [--port 8000]`: serve the search page and API."""
from __future__ import annotations

import argparse
import logging
import sys

from search.cli_common import add_model_args, run_cli

from . import create_app
from .config import WebConfig


def _serve(args: argparse.Namespace) -> int:
    config = WebConfig(index=args.index, model=args.model, pretrained=args.pretrained, device=args.device,
                       images=args.images, max_upload_mb=args.max_upload_mb)
    app = create_app(config)
    logging.getLogger("web").info("serving %s on http://%s:%d", args.index, args.host, args.port)
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m web", description="Serve the search UI and JSON API.")
    parser.add_argument("--index", required=True, help="index directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--images", default=None, help="image root (default: the one recorded at build time)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: 20)")
    add_model_args(parser, default_from_index=True)
    return parser


def main(argv=None) -> int:
    return run_cli(_serve, make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
