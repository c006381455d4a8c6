"""A real multi-node Ray cluster on loopback for the ``cluster`` tests: ``ray start --head`` (with
its dashboard, where Ray Jobs are submitted) and, optionally, a second node started with
``ray start --address``, each with its own resources, token auth on as Ray 2.59+ does (one random
``RAY_AUTH_TOKEN`` in the environment of every node and every client; nothing in ``~/.ray``).

Stopped by PID, never by ``ray stop`` (which stops every Ray of the machine, other sessions'
included): the processes whose command line names this cluster's ``--temp-dir`` and their
children, SIGTERM then SIGKILL. The temp dir is short: Ray's socket paths must fit 107 bytes.

    with LocalRayCluster(worker_cpus=1) as cluster:
        JobSubmissionClient(cluster.dashboard_url)  # in an environment with cluster.env
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0
OBJECT_STORE = ["--object-store-memory", str(256 * 2**20)]
AGENT_PORT_FLAGS = (
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(token: str) -> dict[str, str]:
    """This process's environment for a node or a client of the cluster: token auth, the venv's
    ``lorasweep`` and ``ray`` on PATH (a Ray Job's entrypoint runs ``lorasweep``), no stray
    cluster address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LORASWEEP_"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def own_processes(temp_dir: Path) -> list[psutil.Process]:
    """A cluster's daemons: the processes whose command lines name its ``--temp-dir``."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in a for a in p.info["cmdline"] or []):
                out.append(p)
    return out


def stop_processes(temp_dir: Path, seen: set[int]) -> None:
    """Stop a cluster by PID: its daemons, their children and the pids ``seen`` earlier,
    SIGTERM then (after 10 s) SIGKILL."""
    procs: dict[int, psutil.Process] = {}
    for p in own_processes(temp_dir):
        procs[p.pid] = p
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                procs[c.pid] = c
    for pid in seen:
        with contextlib.suppress(psutil.Error):
            procs.setdefault(pid, psutil.Process(pid))
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


class LocalRayCluster:
    """A head node (``head_cpus``, dashboard on) and, when ``worker_cpus`` is set, a worker node
    with its own CPUs and a custom resource ``worker_node`` (so a test can tell the nodes apart)."""

    def __init__(self, *, head_cpus: int = 1, worker_cpus: int | None = None) -> None:
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lsrc-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.env = cluster_env(self.token)
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.seen: set[int] = set()
        self.log = ""

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ray(self, args: list[str]) -> None:
        # each node's agents on ports of their own: the defaults (52365, ...) are one per machine,
        # and another Ray of this machine may hold them
        ports = []
        for flag in AGENT_PORT_FLAGS:
            ports += [flag, str(free_port())]
        done = subprocess.run(
            # a small object store each: nothing big goes through it, and memory is shared
            [str(BIN / "ray"), "start", *args, *ports, "--disable-usage-stats", *OBJECT_STORE],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        self.log += done.stdout + done.stderr
        self.remember()
        if done.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args[:2])} failed:\n{self.log[-3000:]}")

    def start(self) -> None:
        self._ray(
            [
                "--head",
                "--port",
                str(self.port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(self.head_cpus),
                "--num-gpus",
                "0",
                "--temp-dir",
                str(self.temp_dir),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
            ]
        )
        self._wait_dashboard()
        if self.worker_cpus is not None:
            self._ray(
                [
                    "--address",
                    self.address,
                    "--node-ip-address",
                    "127.0.0.1",
                    "--num-cpus",
                    str(self.worker_cpus),
                    "--num-gpus",
                    "0",
                    "--resources",
                    '{"worker_node": 1}',
                ]
            )

    def _wait_dashboard(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers (401 without the token: auth is on)
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the Ray dashboard did not answer in {START_TIMEOUT_S:g} s")

    def own(self) -> list[psutil.Process]:
        return own_processes(self.temp_dir)

    def remember(self) -> None:
        self.seen |= {p.pid for p in self.own()}

    def stop(self) -> None:
        stop_processes(self.temp_dir, self.seen)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
