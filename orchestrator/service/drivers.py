"""Launching and watching sweep drivers, apart from the API process.

A driver is ``lorasweep run SPEC --new --sweep-id ID --experiment TENANT/NAME`` (or ``lorasweep
resume ID ...`` after a crash). Two kinds:

- ``LocalDrivers``: a subprocess on the service's machine in its own session
  (``start_new_session``), so it outlives the API; stdout and stderr go to the sweep's log file.
  It is known by its PID *and* its start time from ``/proc`` (a PID is reused by the kernel; a
  start time with it is not), so a restarted API reattaches to the very process it launched.
- ``RayJobDrivers``: a Ray Job on a cluster (``--ray-address http://head:8265``), submitted
  through ``JobSubmissionClient`` with ``submission_id = ID-ATTEMPT``; its logs are copied into
  the sweep's log file as they come.

Secrets never go on a command line (``ps`` shows it to every user): database URLs travel in the
environment, and the spec file a driver reads holds the service database's URL without its
password (libpq takes it from ``PGPASSWORD``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from orchestrator.retry import with_backoff
from orchestrator.secrets import redact
from orchestrator.watchdog import CLOSING_GRACE_S

log = logging.getLogger("lorasweep.service")

# a driver's start time read twice from /proc agrees to the clock tick (10 ms); a reused PID
# started at least a fork later, and in practice seconds later
START_TOLERANCE_S = 0.05


# --- processes ---------------------------------------------------------------------------------
def _boot_unix() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("/proc/stat has no btime")


def proc_start_unix(pid: int) -> float | None:
    """When process ``pid`` started (unix seconds, from ``/proc/PID/stat``), or None when it is
    gone or a zombie (it exited and waits for its parent to read its status)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # the command name (field 2) is in parentheses and may hold spaces: split after it
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):  # field 3: the state
            return None
        ticks = int(fields[19])  # field 22: start time in clock ticks after boot
        return _boot_unix() + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _proc_ids(pid: int) -> tuple[int, int] | None:
    """(process group, session) of ``pid``, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[2]), int(fields[3])
    except (OSError, ValueError, IndexError):
        return None


def is_alive(pid: int | None, started_unix: float | None) -> bool:
    """Whether the driver launched as ``pid`` at ``started_unix`` still runs (a PID reused by
    another process is not it)."""
    if not pid:
        return False
    now_start = proc_start_unix(pid)
    if now_start is None:
        return False
    return started_unix is None or abs(now_start - started_unix) <= START_TOLERANCE_S


def kill_session_leftovers(pid: int, started_unix: float | None) -> list[int]:
    """SIGKILL what a dead driver left in its session (its local Ray cluster: GCS, raylet,
    trial workers), so nothing of it goes on billing while the sweep resumes elsewhere; only
    processes of the driver's own session started after the driver. Returns their PIDs."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        other = int(entry.name)
        ids = _proc_ids(other)
        start = proc_start_unix(other)
        if ids is None or start is None or ids[1] != pid:
            continue
        if started_unix is not None and start + START_TOLERANCE_S < started_unix:
            continue  # older than the driver: an unrelated session that reused the number
        try:
            os.kill(other, signal.SIGKILL)
            killed.append(other)
        except ProcessLookupError:
            pass
    return killed


def lorasweep_command() -> list[str]:
    """How to run the ``lorasweep`` CLI of this installation."""
    script = Path(sys.executable).with_name("lorasweep")
    if script.is_file():
        return [str(script)]
    found = shutil.which("lorasweep")
    return [found] if found else [sys.executable, "-c", "from orchestrator.cli import app; app()"]


# A Ray Job's entrypoint: lorasweep as the cluster's nodes have it installed (on their PATH)
JOB_COMMAND = os.environ.get("LORASWEEP_JOB_COMMAND", "lorasweep")
# how long a stopped (cancelled) Ray Job's driver may close its trials and settle before Ray
# SIGKILLs it: the watchdog's closing grace plus a minute to settle
JOB_STOP_WAIT_S = int(CLOSING_GRACE_S + 60)


# --- handles -----------------------------------------------------------------------------------
@dataclass
class DriverHandle:
    """One launched driver: a local process (``pid`` and its start time; ``proc`` while it is
    this API process's own child) or a Ray Job (``job_id``)."""

    sweep_id: str
    pid: int | None = None
    started_unix: float | None = None
    job_id: str | None = None
    proc: subprocess.Popen | None = None
    interrupted_unix: float | None = None  # when a cancel's SIGINT was sent


@dataclass(frozen=True)
class DriverState:
    """What a poll saw: ``alive``, and once gone the exit code when it is known (the API's own
    child, or a Ray Job that reports it)."""

    alive: bool
    exit_code: int | None = None


class Drivers(Protocol):
    def launch(self, sweep_id: str, args: list[str], attempt: int, spec_file: Path) -> DriverHandle:
        """Start ``lorasweep ARGS`` for the sweep."""

    def poll(self, handle: DriverHandle) -> DriverState:
        """Whether the driver runs; its exit code once gone, if known."""

    def interrupt(self, handle: DriverHandle) -> None:
        """Ask the driver to stop: trials close inside their grants, accounts settle."""

    def cleanup(self, handle: DriverHandle) -> None:
        """After a driver died: stop what it left behind."""

    def sync_log(self, handle: DriverHandle) -> None:
        """Bring the sweep's log file up to date (a no-op where the driver writes it)."""


def _driver_env(service_db_url: str) -> dict[str, str]:
    """The environment of a local driver: this one, plus the service database's URL (for
    ``lorasweep resume``'s ``--service-db``) and its password for libpq (the spec file holds the
    URL without it); unbuffered output so the log, and the events read from it, are live."""
    from sqlalchemy.engine import make_url

    env = {**os.environ, "LORASWEEP_SERVICE_DB": service_db_url, "PYTHONUNBUFFERED": "1"}
    env.pop("LORASWEEP_TOKEN", None)  # a client's token has no business in a driver
    password = make_url(service_db_url).password
    if password:
        env["PGPASSWORD"] = str(password)
    return env


class LocalDrivers:
    """Drivers as subprocesses of the service's machine, each in its own session."""

    def __init__(self, *, service_db_url: str, logs_dir: Path, ray_address: str | None) -> None:
        self.service_db_url = service_db_url
        self.logs_dir = logs_dir
        self.ray_address = ray_address

    def launch(self, sweep_id: str, args: list[str], attempt: int, spec_file: Path) -> DriverHandle:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        argv = [*lorasweep_command(), *args]
        if self.ray_address:
            argv += ["--address", self.ray_address]
        with open(self.logs_dir / f"{sweep_id}.log", "ab") as out:  # attempts append
            out.write(f"--- lorasweep service: driver attempt {attempt}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_driver_env(self.service_db_url),
                start_new_session=True,  # outlives the API; Ctrl-C of a `serve` terminal spares it
                close_fds=True,
            )
        return DriverHandle(
            sweep_id, pid=proc.pid, started_unix=proc_start_unix(proc.pid), proc=proc
        )

    def poll(self, handle: DriverHandle) -> DriverState:
        if handle.proc is not None:
            code = handle.proc.poll()  # reaps our own child
            return DriverState(code is None, code)
        return DriverState(is_alive(handle.pid, handle.started_unix))

    def interrupt(self, handle: DriverHandle) -> None:
        # the driver only: its handler stops the trials and settles; the group would also hit
        # its Ray processes, which must stay up while it settles
        if is_alive(handle.pid, handle.started_unix):
            try:
                os.kill(handle.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def cleanup(self, handle: DriverHandle) -> None:
        if handle.pid:
            killed = kill_session_leftovers(handle.pid, handle.started_unix)
            if killed:
                log.info(
                    "sweep %s: killed %d leftover process(es) of its dead driver",
                    handle.sweep_id,
                    len(killed),
                )

    def sync_log(self, handle: DriverHandle) -> None:
        return None


class RayJobDrivers:
    """Drivers as Ray Jobs on a cluster, through its dashboard's job API.

    The spec file goes to the job in its ``working_dir``; the cluster's nodes must have
    lorasweep installed, see the spec's data and storage paths (shared storage), and hold any
    database password in their own environment (``PGPASSWORD``): the job's ``env_vars`` are
    shown by the dashboard, so only password-free URLs go there.
    """

    def __init__(self, *, service_db_url: str, logs_dir: Path, address: str) -> None:
        from ray.job_submission import JobSubmissionClient

        from orchestrator.secrets import hide_password

        self.client = JobSubmissionClient(address)
        self.logs_dir = logs_dir
        self.safe_db_url = _without_password(service_db_url)
        self._hide = hide_password

    def launch(self, sweep_id: str, args: list[str], attempt: int, spec_file: Path) -> DriverHandle:
        job_dir = self.logs_dir.parent / "jobs" / f"{sweep_id}-{attempt}"
        job_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(spec_file, job_dir / "spec.yaml")
        # the job runs in its unpacked working_dir: the spec is ./spec.yaml there
        args = ["spec.yaml" if a == str(spec_file) else a for a in args]
        # the job's driver joins the job's cluster (ray.init would otherwise start its own)
        args += ["--address", "auto"]
        job_id = f"{sweep_id}-{attempt}"
        runtime_env = {
            "working_dir": str(job_dir),
            "env_vars": {
                "LORASWEEP_SERVICE_DB": self.safe_db_url,
                "PYTHONUNBUFFERED": "1",
                # a stop (cancel) is the driver's Ctrl-C: its trials close inside their grants
                # and it settles; Ray's default is SIGTERM, then SIGKILL after 3 s
                "RAY_JOB_STOP_SIGNAL": "SIGINT",
                "RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S),
            },
        }

        def submit() -> None:
            self.client.submit_job(
                entrypoint=" ".join([JOB_COMMAND, *(_quote(a) for a in args)]),
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={"lorasweep.sweep_id": sweep_id, "attempt": str(attempt)},
            )

        try:
            # a head node that just started has no job agent yet ("No available agent to submit
            # job"): 500 for a few seconds
            with_backoff(submit, tries=7, first_s=1.0, cap_s=10.0, again=_transient)
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
            # an API killed between submitting and recording the job: this attempt is that job
            log.info("sweep %s: Ray Job %s was already submitted; watching it", sweep_id, job_id)
        return DriverHandle(sweep_id, job_id=job_id)

    def poll(self, handle: DriverHandle) -> DriverState:
        from ray.job_submission import JobStatus

        try:
            info = self.client.get_job_info(handle.job_id)
        except Exception as exc:  # noqa: BLE001 - the job is unknown: its cluster was replaced
            if "does not exist" in str(exc) or "not found" in str(exc).lower():
                return DriverState(False)
            raise
        if info.status in (JobStatus.PENDING, JobStatus.RUNNING):
            return DriverState(True)
        code = getattr(info, "driver_exit_code", None)
        if code is None and info.status == JobStatus.SUCCEEDED:
            code = 0
        return DriverState(False, code)

    def interrupt(self, handle: DriverHandle) -> None:
        # Ray stops the job with RAY_JOB_STOP_SIGNAL (SIGINT, set at submission; the driver
        # handles SIGTERM alike) and SIGKILLs it after RAY_JOB_STOP_WAIT_TIME_S
        self.client.stop_job(handle.job_id)

    def cleanup(self, handle: DriverHandle) -> None:
        return None  # a job's processes go with the job

    def sync_log(self, handle: DriverHandle) -> None:
        """Append what the job printed since the last copy (the offset is kept next to the log,
        so a restarted API does not copy a line twice)."""
        try:
            text = self.client.get_job_logs(handle.job_id)
        except Exception:  # noqa: BLE001 - logs are best effort; the next poll tries again
            return
        pos_file = self.logs_dir / f"{handle.sweep_id}.logpos"
        try:
            pos = json.loads(pos_file.read_text())
        except (OSError, ValueError):
            pos = {}
        done = pos.get(handle.job_id, 0)
        data = text.encode()
        if len(data) <= done:
            return
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.logs_dir / f"{handle.sweep_id}.log", "ab") as out:
            if done == 0:
                out.write(f"--- lorasweep service: Ray Job {handle.job_id}\n".encode())
            out.write(data[done:])
        pos[handle.job_id] = len(data)
        pos_file.write_text(json.dumps(pos))


def _transient(exc: Exception) -> bool:
    """A job API error that a later try may not meet: no job agent yet, the head restarting."""
    text = str(exc)
    return isinstance(exc, ConnectionError) or "No available agent" in text or "503" in text


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _without_password(url: str) -> str:
    """``url`` with no password at all (a working URL where libpq finds it in ``PGPASSWORD``),
    for files and job settings others can read."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: leave it to redact
        return redact(url)
    if parsed.password is None:
        return url
    return parsed.set(password=None).render_as_string(hide_password=False)


def make_drivers(*, service_db_url: str, logs_dir: Path, ray_address: str | None) -> Drivers:
    """Ray Jobs when ``ray_address`` is a dashboard (``http://``), else local processes (which
    connect to ``ray_address``, e.g. ``ray://head:10001``, when it is given)."""
    if ray_address and ray_address.startswith(("http://", "https://")):
        return RayJobDrivers(service_db_url=service_db_url, logs_dir=logs_dir, address=ray_address)
    return LocalDrivers(service_db_url=service_db_url, logs_dir=logs_dir, ray_address=ray_address)


def wait_gone(handle: DriverHandle, drivers: Drivers, timeout_s: float) -> DriverState:
    """Poll until the driver is gone or ``timeout_s`` passed (tests and shutdown)."""
    deadline = time.monotonic() + timeout_s
    state = drivers.poll(handle)
    while state.alive and time.monotonic() < deadline:
        time.sleep(0.2)
        state = drivers.poll(handle)
    return state
