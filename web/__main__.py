"""`python -m web --index [NAME=]INDEX [--index NAME2=INDEX2 ...] [--indices-paths FILE.json] [--host 127.0.0.1]
[--port 8000]` or `python -m web --demo`: serve the search page and API over one index or several."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import threading
from pathlib import Path

from search.cli_common import CliParser, add_model_args, run_cli
from search.errors import IndexFormatError

from werkzeug.serving import make_server

from . import EXTENSION_KEY, create_app
from .config import ADMIN_TOKEN_ENV, WebConfig, read_indices_paths
from .main_thread import MainThreadRunner


def _serve(args: argparse.Namespace) -> int:
    if args.demo:
        from demo import SCALES, prepare_demo, summary  # the demo's package: not loaded to serve an index

        result = prepare_demo(args.demo_dir, SCALES[args.demo_scale], retrain=args.retrain)
        print(summary(result), flush=True)
        args.index = [str(result.index)]
        if args.prepare_only:
            return 0
    indexes = [named_index(value) for value in args.index or ()]
    if args.indices_paths:
        indexes.extend(read_indices_paths(args.indices_paths))
    if not indexes:
        raise IndexFormatError("give --index INDEX, or --demo for the offline demo (several indexes: --index "
                               "NAME=INDEX repeated, or --indices-paths FILE.json)")
    config = WebConfig(indexes=tuple(indexes), model=args.model, pretrained=args.pretrained, device=args.device,
                       precision=args.precision, runtime=args.runtime,
                       images=args.images, max_upload_mb=args.max_upload_mb, admin_token=args.admin_token,
                       compare_index=args.compare_index, allow_image_urls=args.allow_image_urls)
    runner = MainThreadRunner()  # model calls run on this (the main) thread: see main_thread.py
    app = create_app(config, run_model=runner)
    if not _is_loopback_host(args.host) and app.extensions[EXTENSION_KEY].config.admin_token is None:
        logging.getLogger("web").warning(
            "listening on %s without an admin token: POST /api/reload is refused to every client not on this "
            "machine; set --admin-token or %s to allow it", args.host, ADMIN_TOKEN_ENV)
    server = make_server(args.host, args.port, app, threaded=True)
    served = ", ".join(f"{name}={path}" for name, path in app.extensions[EXTENSION_KEY].config.indexes)
    logging.getLogger("web").info("serving %s on http://%s:%d", served, args.host, args.port)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    try:
        runner.run_forever(threading.Event())  # until Ctrl-C
    finally:
        server.shutdown()
    return 0


def named_index(value: str) -> tuple[str, Path]:
    """`--index NAME=PATH`, or a bare `--index PATH` named after its directory (as is a path that exists with an `=`
    in it)."""
    name, equals, path = value.partition("=")
    if equals and name and path and "/" not in name and not Path(value).exists():
        return name, Path(path)
    return Path(value).expanduser().resolve().name, Path(value)


def _is_loopback_host(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m web", description="Serve the search UI and JSON API.")
    parser.add_argument("--index", action="append", metavar="[NAME=]INDEX",
                        help="index directory; repeat as NAME=INDEX to serve several at once (the first is the "
                             "default; a bare INDEX is named after its directory); one model load per distinct model")
    parser.add_argument("--indices-paths", metavar="FILE.json",
                        help='more indexes from a clip-retrieval indices_paths.json: {"NAME": "INDEX", ...} or '
                             '{"NAME": {"indice_folder": "INDEX"}, ...}, relative paths from the current directory')
    parser.add_argument("--compare-index", metavar="INDEX_B",
                        help="a second index of the same dataset (another model, precision, fine-tune or index type): "
                             "the /eval page compares it with --index (the default one), recall B − A with a 95%% "
                             "interval")
    demo = parser.add_argument_group("offline demo")
    demo.add_argument("--demo", action="store_true",
                      help="generate a scene dataset, train a small CLIP on it, index its test split and serve it "
                           "(each step reused when already done)")
    demo.add_argument("--demo-dir", default="demo_data", help="where the demo keeps its files (default: demo_data)")
    demo.add_argument("--demo-scale", choices=("full", "tiny"), default="full",
                      help="tiny: a seconds-long smoke test of the flow (default: full)")
    demo.add_argument("--prepare-only", action="store_true", help="with --demo: prepare everything, do not serve")
    demo.add_argument("--retrain", action="store_true",
                      help="with --demo: train the model again (and rebuild its index) even if the one in --demo-dir "
                           "was made by the current recipe")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--images", default=None, help="image root (default: the one recorded at build time)")
    parser.add_argument("--admin-token", default=None,
                        help=f"token that POST /api/reload must carry (Authorization: Bearer TOKEN); default: "
                             f"${ADMIN_TOKEN_ENV}; without one, only loopback clients may reload")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: 20)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="let POST /knn-service (the clip-retrieval API) fetch `image_url` queries from public "
                             "addresses (never private, loopback or link-local ones); off by default")
    add_model_args(parser, default_from_index=True)
    return parser


def main(argv=None) -> int:
    return run_cli(_serve, make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
