"""A real multi-node Ray cluster on loopback for tests: `ray start --head` and `ray start --address` as separate
processes, each in its own session so that stopping it kills exactly its processes (`ray stop` would also stop the
test session's own Ray)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def processes_matching(text: str) -> list[int]:
    """Pids whose command line (Ray's process titles included) contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _session_of(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    env: dict
    temp_dir: str
    sessions: list[int] = field(default_factory=list)

    def node_ids(self) -> list[str]:
        """Alive nodes, asked from a separate driver process."""
        code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **self.env}, capture_output=True,
                             text=True, timeout=120)
        return out.stdout.split()


def _ray(*args: str, env: dict) -> int:
    """`ray start ...` in a new session; returns the session id its daemons keep."""
    process = subprocess.Popen([shutil.which("ray") or "ray", "start", *args, "--disable-usage-stats"],
                               env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    out, _ = process.communicate(timeout=120)
    if process.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-2000:]}")
    return process.pid  # the session leader's pid is the session id


def start_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Cluster:
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {"RAY_AUTH_MODE": "token"}  # Ray's default for clusters; workers and drivers must be told
    cluster = Cluster(f"127.0.0.1:{port}", env, temp_dir)
    try:
        cluster.sessions.append(_ray("--head", f"--port={port}", f"--num-cpus={cpus_per_node}",
                                     "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                                     f"--temp-dir={temp_dir}", env=env))
        for _ in range(nodes - 1):
            cluster.sessions.append(_ray(f"--address={cluster.address}", f"--num-cpus={cpus_per_node}",
                                         "--node-ip-address=127.0.0.1", env=env))
        deadline = time.monotonic() + 60
        while len(cluster.node_ids()) < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster at {cluster.address} did not reach {nodes} nodes")
            time.sleep(1)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    """Kill every process of the cluster's sessions (daemons, raylets and the workers they started)."""
    for _ in range(3):
        pids = [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and _session_of(int(p.name)) in cluster.sessions]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
