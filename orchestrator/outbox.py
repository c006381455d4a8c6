"""MLflow writes off Tune's loop: an unreachable MLflow server must not stall the sweep.

Tune calls the sweep's callback on the driver's one loop, and a trial's ``tune.report`` waits
until that loop has taken its result. A callback that waits on MLflow (a server restarting, a
locked sqlite file) would hold every running trial in ``report``: GPUs held, nothing trained, and
the watchdog killing trials whose grants ran out while they waited. The callback puts its MLflow
writes here instead; one thread writes them in order, retrying each until it lands, so the
trials go on and nothing is lost. Before anything reads MLflow back (the full-FT gate, the
summary) the driver waits for the outbox to drain (``flush``). An MLflow down for longer than
``LORASWEEP_MLFLOW_OUTAGE_S`` (default 120 s) stops the sweep, its accounts settled (``on_outage``);
what the outbox still holds then is named in the sweep's end reason, not silently dropped.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

from orchestrator.secrets import redact

RETRY_FIRST_S = 0.5
RETRY_CAP_S = 10.0
# MLflow's answers that writing again cannot change (a bad value, a duplicate): not retried
PERMANENT_CODES = (
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",  # e.g. the run was deleted in the UI meanwhile
    "BAD_REQUEST",
)


def _permanent(exc: Exception) -> bool:
    """A write that cannot land by trying again: MLflow refused its content, or our own code
    failed on it (a bug, named rather than retried forever ahead of every later write)."""
    if getattr(exc, "error_code", None) in PERMANENT_CODES:
        return True
    return isinstance(exc, TypeError | ValueError | KeyError | AttributeError) and not hasattr(
        exc, "error_code"
    )


class Outbox:
    """A FIFO of MLflow writes with one writer thread; each write is retried until it lands."""

    def __init__(
        self,
        name: str = "lorasweep-mlflow",
        on_outage: Callable[[str], None] | None = None,
        outage_s: float | None = None,
    ) -> None:
        # an MLflow down longer than outage_s is no longer a hiccup: on_outage(why) is called
        # once (the sweep stops, its accounts settled) while the writes keep being retried
        self.on_outage = on_outage
        self.outage_s = float(os.environ.get("LORASWEEP_MLFLOW_OUTAGE_S", "120"))
        self.outage_s = self.outage_s if outage_s is None else outage_s
        self._failing_since: float | None = None
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self.failing: str | None = None  # the last error while a write keeps failing
        self.written = 0
        self.errors: list[str] = []  # writes MLflow refused for good (named, not retried)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, fn: Callable, *args, **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)``; it runs after every write queued before it."""
        with self._idle:
            self._pending += 1
        self._queue.put((fn, args, kwargs))

    def flush(self, timeout_s: float, stop: Callable[[], bool] | None = None) -> bool:
        """Wait until every queued write landed; False if some had not after ``timeout_s`` (or
        once ``stop()`` holds)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop()):
                    return False
                self._idle.wait(min(left, 1.0))
        return True

    @property
    def pending(self) -> int:
        with self._idle:
            return self._pending

    def close(self) -> None:
        """Stop the writer (after ``flush``); writes still queued are dropped."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _note_outage(self) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since > self.outage_s and self.on_outage is not None:
            on_outage, self.on_outage = self.on_outage, None  # once
            on_outage(f"MLflow unreachable for {self.outage_s:.0f} s: {self.failing}")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, kwargs = item
            wait_s = RETRY_FIRST_S
            while not self._closed.is_set():
                try:
                    fn(*args, **kwargs)
                    break
                except Exception as exc:  # noqa: BLE001 - MLflow down: wait, then write again
                    self.failing = redact(f"{type(exc).__name__}: {exc}")[:500]
                    if _permanent(exc):
                        self.errors.append(f"{getattr(fn, '__name__', 'write')}: {self.failing}")
                        break
                    self._note_outage()
                    self._closed.wait(wait_s)
                    wait_s = min(2 * wait_s, RETRY_CAP_S)
            self.failing = None
            self._failing_since = None
            self.written += 1
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
