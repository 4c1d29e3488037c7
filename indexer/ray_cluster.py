"""Joining or starting the Ray cluster a job runs on (`--engine ray`).

Ray is imported here and in the modules that run work on it, never by `search/` (queries need no Ray) nor at the
import of `indexer` (so `--engine local` and `--help` do not pay for it).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from search.errors import EngineError

ENGINES = ("local", "ray")  # --engine
AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int | None = None) -> Iterator[dict]:
    """Yield the cluster's resources ({"CPU": .., "GPU": ..}) with Ray connected: the caller's session when one is
    already initialised (tests, notebooks; left running), else the cluster at `address` (HOST:PORT or "auto"), else a
    local Ray of `workers` CPUs (default: every core) started now and shut down on exit."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # its INFO/WARNING lines narrate plans and log folders
    try:
        import ray
    except ImportError:
        raise EngineError("--engine ray needs Ray: pip install 'ray[data]'") from None
    if ray.is_initialized():
        yield _resources(ray)
        return
    options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                   configure_logging=False)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        hint = ""
        if address and os.environ.get(AUTH_MODE_VARIABLE) is None:
            hint = (f" (a cluster started with token authentication, Ray's default, needs {AUTH_MODE_VARIABLE}=token "
                    f"and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN)")
        raise EngineError(f"cannot start or join {where}: {str(exc).strip().splitlines()[0]}{hint}") from None
    try:
        yield _resources(ray)
    finally:
        ray.shutdown()


def _resources(ray) -> dict:
    resources = ray.cluster_resources()
    return {"CPU": int(resources.get("CPU", 0)), "GPU": int(resources.get("GPU", 0))}
