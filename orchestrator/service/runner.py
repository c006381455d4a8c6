"""The service's runner: starts queued sweeps, watches their drivers, reattaches after a restart.

The API never runs a sweep itself. Each sweep's driver is a process of its own
(``orchestrator/service/drivers.py``), so the API can restart without losing one:

- ``start()`` reconciles ``service_sweeps`` with what is alive: a ``running`` sweep whose driver
  process still runs (same PID, same start time) is watched again, not relaunched; one whose
  driver died is resumed through ``lorasweep resume`` (at most ``MAX_ATTEMPTS`` launches in
  all, then ``failed`` with the reason);
- a daemon thread then starts queued sweeps in the order they were created while fewer than
  ``max_running_sweeps`` run, and watches the running ones: a driver that is gone ends its
  sweep as the ledger recorded it (``lorasweep_sweeps.state``, written by the driver) and, for
  the API's own child, as its exit code says (0 completed, 130 interrupted, 2 bad input);
- ``cancel()`` cancels a queued sweep at once and sends a running driver SIGINT: its trials
  close inside their grants, every account settles, what was spent stays on record.

Imports no torch: promotion (which scores the test split) runs ``lorasweep promote`` in a
subprocess, and so does abandoning the accounts of a cancelled sweep whose driver died.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import yaml
from sqlalchemy import select, update

from orchestrator.errors import LorasweepError
from orchestrator.secrets import redact
from orchestrator.service.db import ServiceSweep, run_in_session
from orchestrator.service.drivers import (
    DriverHandle,
    _driver_env,
    _without_password,
    lorasweep_command,
    make_drivers,
)
from orchestrator.watchdog import CLOSING_GRACE_S

__all__ = ["Runner", "MAX_ATTEMPTS"]

log = logging.getLogger("lorasweep.service")

MAX_ATTEMPTS = 3  # driver launches of one sweep: the first and two resumes
POLL_S = float(os.environ.get("LORASWEEP_RUNNER_POLL_S", "1.0"))
# a cancelled driver gets this long to close its trials and settle before a second SIGINT
# (which stops it at once, still settling): its own closing grace plus a minute to settle
CANCEL_GRACE_S = CLOSING_GRACE_S + 60.0
PROMOTE_TIMEOUT_S = 3600.0  # promotion scores the test split with the base model + adapter
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _LogIndex:
    """A sweep's log file read incrementally: its complete lines, each with the time this
    service first saw it (within one poll of when the driver wrote it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            try:
                size = self.path.stat().st_size
            except OSError:
                return
            if size < self.offset:  # the file was replaced: read it again
                self.offset, self.lines = 0, []
            if size == self.offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
            end = data.rfind(b"\n")
            if end < 0:
                return  # no complete line yet
            now = time.time()
            for raw in data[: end + 1].splitlines():
                text = _ANSI.sub("", raw.decode("utf-8", errors="replace")).rstrip()
                self.lines.append((redact(text), now))
            self.offset += end + 1

    def after(self, after_id: int) -> list[tuple[int, dict]]:
        self.refresh()
        with self.lock:
            return [
                (i, {"line": text, "ts_unix": ts})
                for i, (text, ts) in enumerate(self.lines[max(after_id, 0) :], start=after_id + 1)
            ]


class Runner:
    """Runs the service's sweeps apart from the API (see the module's docstring)."""

    def __init__(
        self,
        engine,
        *,
        service_db_url: str,
        data_dir: Path,
        ray_address: str | None,
        max_running_sweeps: int,
    ) -> None:
        self.engine = engine
        self.service_db_url = service_db_url
        self.data_dir = Path(data_dir)
        self.ray_address = ray_address
        self.max_running_sweeps = max_running_sweeps
        self.specs_dir = self.data_dir / "service" / "specs"
        self.logs_dir = self.data_dir / "service" / "logs"
        self.poll_s = POLL_S
        self._drivers = None  # made at start(): a Ray Job client connects to its cluster
        self._watched: dict[str, DriverHandle] = {}
        self._logs: dict[str, _LogIndex] = {}
        self._lock = threading.RLock()  # _watched and every launch / end decision
        self._logs_lock = threading.Lock()  # _logs (events are read by the API's threads)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    # --- the API's interface -----------------------------------------------------------------
    def start(self) -> None:
        """Reconcile with the drivers alive (reattach, or resume the dead), then watch in a
        daemon thread."""
        if self.engine is None:  # a runner without a database (tests of its parts): idle
            return
        self._drivers = make_drivers(
            service_db_url=self.service_db_url, logs_dir=self.logs_dir, ray_address=self.ray_address
        )
        self._reconcile()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lorasweep-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; the drivers keep running (a restarted API reattaches to them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def wake(self) -> None:
        """A sweep was queued or cancelled: act now rather than at the next poll."""
        self._wake.set()

    def cancel(self, sweep_id: str) -> None:
        """Cancel the sweep: a queued one at once; a running one by SIGINT to its driver (its
        trials close inside their grants, it settles and exits; the watcher then records it
        ``cancelled``). Idempotent; a finished sweep is left as it is."""

        def work(s):
            row = s.get(ServiceSweep, sweep_id)
            if row is None or row.state not in ("queued", "running"):
                return None
            row.cancel_requested = True
            if row.state == "queued":
                row.state, row.ended_unix = "cancelled", time.time()
                row.end_reason = "cancelled before it started"
            return row.state

        # a running driver gets its SIGINT from the watcher (at once: woken), which owns it
        run_in_session(self.engine, work, what=f"cancel of {sweep_id}")
        self.wake()

    def events(self, sweep_id: str, after_id: int = 0) -> list[tuple[int, dict]]:
        """The driver's progress lines after line ``after_id``: ``(line number, {"line",
        "ts_unix"})``, secrets redacted; the numbering goes on across resumed attempts."""
        return self._log_index(sweep_id).after(after_id)

    def promote(self, sweep_id: str) -> dict:
        """Register the sweep's best adapter as ``TENANT.NAME`` with alias ``champion``:
        ``{"model", "version", "alias", "test_score"}``. Runs ``lorasweep promote`` in a
        subprocess (it loads the model to score the test split)."""
        row = self._row(sweep_id)
        if row is None:
            raise LorasweepError(f"SWEEP: no sweep {sweep_id!r}")
        spec = yaml.safe_load(row.spec_yaml) or {}
        model = f"{row.tenant}.{spec.get('name', row.name)}"
        env = {**_driver_env(self.service_db_url), "LORASWEEP_TRACKING_URI": _tracking_uri(spec)}
        try:
            done = subprocess.run(
                [*lorasweep_command(), "promote", sweep_id, "--name", model],
                capture_output=True,
                text=True,
                env=env,
                timeout=PROMOTE_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise LorasweepError(
                f"promote: scoring {sweep_id}'s best trial took over {PROMOTE_TIMEOUT_S:.0f} s"
            ) from None
        out = " ".join(redact(done.stdout).split())  # rich wraps long lines: join them again
        m = re.search(r"registered (\S+) version (\d+) as @(\S+?):", out)
        if done.returncode != 0 or m is None:
            err = re.search(r"error: (.*)", out)
            reason = err.group(1) if err else (out or redact(done.stderr).strip())[-500:]
            raise LorasweepError(f"promote: {reason}")
        test = re.search(r"test score (-?[0-9.]+)", out)
        return {
            "model": m.group(1),
            "version": m.group(2),
            "alias": m.group(3),
            "test_score": float(test.group(1)) if test else None,
        }

    # --- the watcher ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - a bad poll must not end the watcher
                log.warning("runner: %s: %s", type(exc).__name__, redact(str(exc)))
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        with self._lock:
            for sweep_id in list(self._watched):
                self._watch(sweep_id)
            self._start_queued()

    def _reconcile(self) -> None:
        """Take up every ``running`` sweep again: the first tick sees which drivers are alive
        (watched again) and which died (resumed)."""
        rows = run_in_session(
            self.engine,
            lambda s: list(s.scalars(select(ServiceSweep).where(ServiceSweep.state == "running"))),
            what="read of running sweeps",
        )
        with self._lock:
            for row in rows:
                self._watched[row.id] = DriverHandle(
                    row.id,
                    pid=row.driver_pid,
                    started_unix=row.driver_started_unix,
                    job_id=row.job_id,
                )
                log.info("runner: taking up running sweep %s", row.id)
            for sweep_id in list(self._watched):
                self._watch(sweep_id)

    def _watch(self, sweep_id: str) -> None:
        handle = self._watched[sweep_id]
        self._drivers.sync_log(handle)
        self._log_index(sweep_id).refresh()  # timestamps lines as they come
        row = self._row(sweep_id)
        if row is None or row.state != "running":  # ended elsewhere (another API instance)
            self._watched.pop(sweep_id, None)
            return
        state = self._drivers.poll(handle)
        if state.alive:
            if row.cancel_requested:
                self._interrupt(handle)
            return
        self._drivers.sync_log(handle)
        self._log_index(sweep_id).refresh()
        self._gone(row, handle, state.exit_code)

    def _interrupt(self, handle: DriverHandle) -> None:
        """SIGINT once; again (stop at once, still settling) if it is still there after the
        grace period."""
        now = time.monotonic()
        if handle.interrupted_unix is None or now - handle.interrupted_unix > CANCEL_GRACE_S:
            log.info("runner: stopping sweep %s (cancel requested)", handle.sweep_id)
            handle.interrupted_unix = now
            self._drivers.interrupt(handle)

    def _gone(self, row: ServiceSweep, handle: DriverHandle, exit_code: int | None) -> None:
        """The driver is gone: end the sweep as the ledger and the exit code say, or resume it."""
        self._watched.pop(row.id, None)
        ledger = self._ledger_row(row.id)
        lstate = ledger.state if ledger is not None else None
        lreason = ledger.end_reason if ledger is not None else None
        if row.cancel_requested:
            self._settle_cancelled(row, handle, lstate)
            return self._end(row.id, "cancelled", "cancelled", exit_code)
        if exit_code == 0 or lstate == "completed":
            return self._end(row.id, "completed", lreason, exit_code)
        if exit_code == 2 or lstate == "failed":
            return self._end(row.id, "failed", lreason or self._last_error(row.id), exit_code)
        # killed (SIGKILL, OOM, a lost node), crashed, or interrupted from outside (SIGTERM at a
        # shutdown): the sweep goes on where it stopped
        what = "interrupted" if exit_code == 130 or lstate == "interrupted" else "died"
        self._drivers.cleanup(handle)
        if row.attempts >= MAX_ATTEMPTS:
            end = "interrupted" if what == "interrupted" else "failed"
            last = self._last_line(row.id)
            return self._end(
                row.id,
                end,
                f"its driver {what} {row.attempts} times (exit code {exit_code}"
                + (f", last said: {last[:200]}" if last else "")
                + f"); lorasweep resume {row.id} continues it",
                exit_code,
            )
        log.info("runner: sweep %s: driver %s (exit code %s); resuming", row.id, what, exit_code)
        if ledger is not None and ledger.state == "running":
            # the driver is gone for sure (its process or job ended): say so, so that resume
            # does not wait for its heartbeat to go stale
            self._store_().set_sweep(row.id, state="interrupted")
        self._launch(row, resume=ledger is not None and ledger.state is not None)

    def _settle_cancelled(self, row: ServiceSweep, handle: DriverHandle, lstate) -> None:
        """A cancelled sweep's driver is gone: nothing may stay reserved. A driver that settled
        (the SIGINT path) left nothing open; one that died first has its open accounts settled
        at what they spent up to the crash (``lorasweep abandon``)."""
        if lstate is None:
            return
        store = self._store_()
        open_accounts = [a for a in store.accounts(row.id) if not a.settled]
        if open_accounts:
            self._drivers.cleanup(handle)
            if lstate == "running":
                store.set_sweep(row.id, state="interrupted")
            spec = yaml.safe_load(row.spec_yaml) or {}
            env = {
                **_driver_env(self.service_db_url),
                "LORASWEEP_TRACKING_URI": _tracking_uri(spec),
            }
            done = subprocess.run(
                [*lorasweep_command(), "abandon", row.id],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                stdin=subprocess.DEVNULL,
            )
            if done.returncode != 0:
                log.warning("runner: abandon of %s: %s", row.id, redact(done.stdout)[-500:])
        store.set_sweep(row.id, state="cancelled", end_reason="cancelled")

    def _end(self, sweep_id: str, state: str, reason: str | None, exit_code: int | None) -> None:
        def work(s):
            row = s.get(ServiceSweep, sweep_id)
            row.state, row.ended_unix, row.exit_code = state, time.time(), exit_code
            row.end_reason = (reason or state)[:500]

        run_in_session(self.engine, work, what=f"end of {sweep_id}")
        log.info("runner: sweep %s %s: %s", sweep_id, state, redact(reason or ""))
        self._wake.set()  # a slot is free

    # --- launching -----------------------------------------------------------------------------
    def _start_queued(self) -> None:
        while True:
            running, next_id = run_in_session(self.engine, self._queue_head, what="read of queue")
            if next_id is None or running >= self.max_running_sweeps:
                return
            row = self._claim(next_id)
            if row is not None:
                self._launch(row, resume=False)

    @staticmethod
    def _queue_head(s) -> tuple[int, str | None]:
        running = len(
            list(s.scalars(select(ServiceSweep.id).where(ServiceSweep.state == "running")))
        )
        head = s.scalars(
            select(ServiceSweep.id)
            .where(ServiceSweep.state == "queued", ServiceSweep.cancel_requested.is_not(True))
            .order_by(ServiceSweep.created_unix, ServiceSweep.id)
            .limit(1)
        ).first()
        return running, head

    def _claim(self, sweep_id: str) -> ServiceSweep | None:
        """Mark the queued sweep running unless a cancel (or another runner) got it first."""

        def work(s):
            changed = s.execute(
                update(ServiceSweep)
                .where(
                    ServiceSweep.id == sweep_id,
                    ServiceSweep.state == "queued",
                    ServiceSweep.cancel_requested.is_not(True),
                )
                .values(state="running", started_unix=time.time(), attempts=0)
                .execution_options(synchronize_session=False)
            ).rowcount
            return s.get(ServiceSweep, sweep_id) if changed else None

        return run_in_session(self.engine, work, what=f"start of {sweep_id}")

    def _launch(self, row: ServiceSweep, *, resume: bool) -> None:
        """Start the sweep's driver (``run``, or ``resume`` when an earlier one began it) and
        record it."""
        attempt = (row.attempts or 0) + 1
        try:
            spec_file = self._write_spec(row)
            if resume:
                args = ["resume", row.id, "--spec", str(spec_file)]
            else:
                args = ["run", str(spec_file), "--new", "--sweep-id", row.id]
            handle = self._drivers.launch(
                row.id, [*args, "--experiment", row.experiment], attempt, spec_file
            )
        except Exception as exc:  # noqa: BLE001 - say why on the sweep instead of retrying
            reason = f"its driver could not start: {type(exc).__name__}: {redact(str(exc))}"
            return self._end(row.id, "failed", reason, None)

        def work(s):
            r = s.get(ServiceSweep, row.id)
            r.driver_pid, r.driver_started_unix = handle.pid, handle.started_unix
            r.job_id, r.attempts, r.exit_code = handle.job_id, attempt, None
            r.state = "running"
            r.started_unix = r.started_unix or time.time()
            return r.cancel_requested

        cancelled = run_in_session(self.engine, work, what=f"launch of {row.id}")
        self._watched[row.id] = handle
        log.info(
            "runner: sweep %s: driver %s (attempt %d, %s)",
            row.id,
            handle.pid or handle.job_id,
            attempt,
            "resume" if resume else "run",
        )
        if cancelled:  # cancelled while it was being launched
            self._interrupt(handle)

    def _write_spec(self, row: ServiceSweep) -> Path:
        """The spec file the driver reads: the spec as admitted, its ledger in the service
        database (the tenant's quota reads spend there), without the database's password."""
        spec = yaml.safe_load(row.spec_yaml) or {}
        storage = dict(spec.get("storage") or {})
        storage["service_db"] = _without_password(self.service_db_url)
        spec["storage"] = storage
        self.specs_dir.mkdir(parents=True, exist_ok=True)
        path = self.specs_dir / f"{row.id}.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
        tmp.chmod(0o600)
        tmp.replace(path)
        return path.resolve()

    # --- reads ---------------------------------------------------------------------------------
    def _row(self, sweep_id: str) -> ServiceSweep | None:
        return run_in_session(
            self.engine, lambda s: s.get(ServiceSweep, sweep_id), what=f"read of {sweep_id}"
        )

    def _store_(self):
        from orchestrator.store import Store

        if self._store is None:
            self._store = Store(self.service_db_url)
        return self._store

    def _ledger_row(self, sweep_id: str):
        try:
            return self._store_().sweep(sweep_id)
        except LorasweepError as exc:
            log.warning("runner: ledger of %s: %s", sweep_id, exc)
            return None

    def _log_index(self, sweep_id: str) -> _LogIndex:
        with self._logs_lock:
            index = self._logs.get(sweep_id)
            if index is None:
                index = self._logs[sweep_id] = _LogIndex(self.logs_dir / f"{sweep_id}.log")
            return index

    def _last_line(self, sweep_id: str) -> str | None:
        """The driver's last words (a traceback's last line, say)."""
        for _, event in reversed(self.events(sweep_id)):
            if event["line"].strip() and not event["line"].startswith("--- lorasweep service"):
                return event["line"].strip()
        return None

    def _last_error(self, sweep_id: str) -> str | None:
        """The driver's own one-line error (``error: FIELD: ...``), if it printed one."""
        for _, event in reversed(self.events(sweep_id)):
            if event["line"].startswith("error:"):
                return event["line"][len("error:") :].strip()
        return None


def _tracking_uri(spec: dict) -> str:
    """The sweep's MLflow tracking URI, as the driver computes it (``storage_urls``)."""
    from orchestrator.tracking import default_tracking_uri

    storage = spec.get("storage") or {}
    return storage.get("mlflow_tracking_uri") or default_tracking_uri(
        Path(storage.get("data_dir") or "lorasweep-data")
    )
