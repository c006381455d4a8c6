"""A real ``lorasweep serve`` for the service tests: a uvicorn subprocess on a free loopback port,
over a given database URL, waited for on ``/healthz`` and stopped by its PID (never by name, so
other servers and the sweep drivers it started are left alone).

Used by ``tests/test_service_api.py`` and ``tests/test_service_runs.py``::

    with service_db("postgresql", tmp_path) as db_url:
        token = create_token(db_url, "team-a", quota_usd=5.0, cwd=tmp_path)
        with serve(db_url, cwd=tmp_path, max_running_sweeps=0) as server:
            httpx.get(f"{server.url}/v1/tenant", headers=server.auth(token))
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _ledger_db import PG_URL, require_pg

START_TIMEOUT_S = 60.0  # imports (mlflow, ray's client) and migrations: ~5-15 s on a busy box
STOP_TIMEOUT_S = 20.0


def lorasweep_bin() -> str:
    """The ``lorasweep`` entry point of the interpreter running the tests (the venv's)."""
    here = Path(sys.executable).with_name("lorasweep")
    return str(here) if here.exists() else (shutil.which("lorasweep") or "lorasweep")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceServer:
    """A running ``lorasweep serve``; ``log_path`` holds its stdout and stderr."""

    url: str
    port: int
    db_url: str
    cwd: Path
    proc: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send ``sig`` to the server's PID and wait for it to exit (SIGKILL after
        ``timeout_s``); returns its exit code."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the server (a crash: no shutdown handlers run)."""
        return self.stop(signal.SIGKILL)

    def mapped_libraries(self) -> str:
        """The server process's memory map (``/proc/PID/maps``): torch, once imported, shows as
        its ``libtorch*`` shared objects."""
        return Path(f"/proc/{self.proc.pid}/maps").read_text()


def start_server(
    db_url: str,
    *,
    cwd: Path,
    max_running_sweeps: int | None = None,
    ray_address: str | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> ServiceServer:
    """Start ``lorasweep serve`` in ``cwd`` (data paths of submitted specs resolve there) on a
    free port and wait until ``/healthz`` answers 200; raises with the server's log if it exits
    or does not answer within ``timeout_s``."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [lorasweep_bin(), "serve", "--host", "127.0.0.1", "--port", str(port), "--db", db_url]
    if max_running_sweeps is not None:
        args += ["--max-running-sweeps", str(max_running_sweeps)]
    if ray_address is not None:
        args += ["--ray-address", ray_address]
    args += list(extra_args)
    log_path = cwd / f"serve-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = ServiceServer(f"http://127.0.0.1:{port}", port, db_url, cwd, proc, log_path, args)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorasweep serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(
        f"lorasweep serve did not answer /healthz in {timeout_s:g} s:\n{server.log()}"
    )


@contextmanager
def serve(db_url: str, **kwargs) -> Iterator[ServiceServer]:
    """``start_server(db_url, **kwargs)``, stopped (by its PID) when the block ends."""
    server = start_server(db_url, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def run_cli(args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None, timeout_s=120):
    """``lorasweep ARGS`` in ``cwd``; the completed process (text stdout / stderr)."""
    return subprocess.run(
        [lorasweep_bin(), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def create_token(db_url: str, tenant: str, *, quota_usd: float | None = None, cwd: Path) -> str:
    """A new token of ``tenant`` (created with its quota if new) by the real ``lorasweep tokens
    create``: its last line of stdout."""
    args = ["tokens", "create", "--tenant", tenant, "--db", db_url]
    if quota_usd is not None:
        args += ["--quota-usd", str(quota_usd)]
    done = run_cli(args, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"lorasweep tokens create failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip().splitlines()[-1]


@contextmanager
def service_db(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty service database URL: a sqlite file under ``tmp_path``, or a PostgreSQL
    database ``lorasweep_service_test_<random>`` created for the block and dropped after it
    (skipped without PostgreSQL, failed under ``CI=true``: see ``_ledger_db.require_pg``)."""
    if backend == "sqlite":
        yield f"sqlite:///{Path(tmp_path) / 'service.db'}"
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url

    admin_url = make_url(require_pg(PG_URL))
    name = f"lorasweep_service_test_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # a server or driver still connected would block the drop: end its sessions first
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()
