"""The watchdog outside the trials: a hang cannot bill.

A trial checks its grant before every step (``workers/train.py``), but a step, eval, save or
model load that hangs never reaches the next check. The watchdog runs in the driver, in a thread,
and every ``POLL_S`` reads the ledger's open accounts. A trial's live spend is its last heartbeat
(the trial sends its billed seconds every ``HEARTBEAT_S``) plus the time since that heartbeat was
first seen, at the trial's price, on the driver's monotonic clock, and never less than the time
since the trial was registered (Tune's start of it, after its worker holds its resources). When
the live spend reaches

    ceiling + MARGIN_S x price    the grant is revoked: the trial stops before its next step
                                   (no closing eval) and Tune stops it at its next report;
    ... + GRACE_S x price          the trial's actor is killed (``ray.kill``); its account is
                                   settled at no less than the watchdog's estimate.

So a trial spends at most its ceiling + ``allowance_usd(price)``, which the ledger keeps
committed for every running trial: the cap holds whatever a trial does. If the ledger itself
stops answering, the watchdog kills every watched trial and stops the sweep (``control.fatal``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator import remote
from orchestrator.prices import cost_usd
from orchestrator.secrets import redact

POLL_S = 0.5
REPORT_SLACK_S = 0.5  # a spend is taken as at most one poll plus this old (clocks of two nodes)
MARGIN_S = 2.0  # over the ceiling before the grant is revoked
GRACE_S = 5.0  # after revoking, before the actor is killed
HEARTBEAT_S = 2.0  # a running trial's billed seconds reach the ledger at least this often
KILL_LATENCY_S = 2.0  # ray.kill until the process is gone, measured well under this here
# after Ctrl-C, how long the running trials may take to close (final eval, save) before they are
# stopped without it; their grants bound what the closing costs
CLOSING_GRACE_S = float(os.environ.get("LORASWEEP_CLOSING_GRACE_S", "300"))


def allowance_usd(price_usd_per_hour: float) -> float:
    """What a running trial may spend past its ceiling before the watchdog has killed it."""
    return cost_usd(price_usd_per_hour, MARGIN_S + GRACE_S + 2 * POLL_S + KILL_LATENCY_S)


@dataclass
class SweepControl:
    """What the driver's parts tell each other: trials whose grant is gone, and why the sweep
    must stop (None while it may go on). Plain data: Tune pickles its stopper with it."""

    revoked: set[str] = field(default_factory=set)
    fatal: str | None = None
    interrupted: bool = False  # Ctrl-C, SIGTERM, a cancel: running trials close, none starts
    ended: str | None = None  # the sweep ends early but in order (e.g. trials keep failing)
    running: set[str] = field(default_factory=set)  # trials started and not finished
    interrupted_at: float | None = None  # monotonic time of the interrupt
    at_once: bool = False  # a second interrupt, or the closing took too long: stop everything
    wound_down: bool = False  # the ledger told the running trials to close
    settling: bool = False  # the trials ended; the driver drains MLflow and settles

    def interrupt(self) -> None:
        """The first interrupt closes the running trials inside their grants; the second stops
        them at once."""
        if self.interrupted:
            self.at_once = True
        self.interrupted = True
        self.interrupted_at = self.interrupted_at or time.monotonic()

    def must_stop_all(self) -> bool:
        """Whether Tune must stop every trial now: an error, an orderly end, or an interrupt
        whose running trials have closed (or that may not wait for them)."""
        if self.fatal is not None or self.ended is not None or self.at_once:
            return True
        if not self.interrupted:
            return False
        waited_s = time.monotonic() - (self.interrupted_at or time.monotonic())
        return not self.running or waited_s > CLOSING_GRACE_S

    def fail(self, cause: str) -> None:
        """Record the first reason the sweep must stop (passwords in it hidden)."""
        if self.fatal is None:
            self.fatal = redact(cause)


@dataclass
class _Watched:
    kill: Callable[[], None]
    since: float  # driver monotonic time the trial was registered
    spent_usd: float = 0.0
    seen: float = 0.0  # driver monotonic time spent_usd was first seen
    killed_usd: float | None = None


class Watchdog:
    """Stops, then kills, any trial whose live spend passes its ceiling (see module doc)."""

    def __init__(self, ledger, price_usd_per_hour: float, control: SweepControl) -> None:
        self.ledger, self.price_usd_per_hour, self.control = ledger, price_usd_per_hour, control
        self._watched: dict[str, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorasweep-watchdog", daemon=True)
        self.kills: list[str] = []

    # --- registration (from the Tune callback) --------------------------------------------
    def watch(self, trial_id: str, kill: Callable[[], None], spent_usd: float = 0.0) -> None:
        """Watch a trial from now; ``spent_usd``: what its earlier attempts spent (a retry),
        from which its live spend goes on until its own first heartbeat."""
        now = time.monotonic()
        with self._lock:
            self._watched[trial_id] = _Watched(kill, since=now, spent_usd=spent_usd, seen=now)

    def unwatch(self, trial_id: str) -> float | None:
        """Stop watching; returns the spend the watchdog settled a killed trial at, if it did."""
        with self._lock:
            w = self._watched.pop(trial_id, None)
        return None if w is None else w.killed_usd

    def started(self) -> list[str]:
        """The trials being watched (started by Tune, not finished)."""
        with self._lock:
            return list(self._watched)

    def live_usd(self, trial_id: str) -> float | None:
        with self._lock:
            w = self._watched.get(trial_id)
            return None if w is None else self._estimate(w, time.monotonic())

    def since_heartbeat_usd(self, trial_id: str) -> float | None:
        """The trial's last heartbeat seen (on its own process's clock) plus the driver's time
        since: what a trial whose end the driver learns of now spent. Unlike :meth:`live_usd`
        it has no floor at the time since registration, which counts a worker's start-up that
        its own clock (and the OS) did not yet bill, or a retry's wait for its new worker."""
        with self._lock:
            w = self._watched.get(trial_id)
            if w is None:
                return None
            return w.spent_usd + cost_usd(self.price_usd_per_hour, time.monotonic() - w.seen)

    # --- the thread -------------------------------------------------------------------------
    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.check()
            except remote.ActorUnavailable as exc:
                self.control.fail(str(exc))
                self.kill_all()
            except Exception as exc:  # noqa: BLE001 - the watchdog must not die silently
                self.control.fail(f"watchdog: {type(exc).__name__}: {exc}")
                self.kill_all()

    def _estimate(self, w: _Watched, now: float) -> float:
        since_heartbeat = w.spent_usd + cost_usd(self.price_usd_per_hour, now - w.seen)
        return max(since_heartbeat, cost_usd(self.price_usd_per_hour, now - w.since))

    def check(self) -> None:
        """One pass over the watched trials (the thread calls this every ``POLL_S``)."""
        if self.control.interrupted:  # every poll: a restarted ledger forgets it (idempotent)
            remote.call(self.ledger.wind_down, timeout_s=10.0)  # trials close at their next step
            self.control.wound_down = True
        with self._lock:
            if not self._watched:
                return
        accounts = remote.call(self.ledger.open_accounts, timeout_s=10.0)
        now = time.monotonic()
        margin = cost_usd(self.price_usd_per_hour, MARGIN_S)
        grace = cost_usd(self.price_usd_per_hour, GRACE_S)
        to_revoke, to_kill = [], []
        with self._lock:  # decide under the lock; call the ledger after it (Tune's thread waits)
            for trial_id, w in self._watched.items():
                acct = accounts.get(trial_id)
                if acct is None or w.killed_usd is not None:
                    continue
                if acct["spent_usd"] > w.spent_usd:  # as of when it came, not of this poll
                    ago_s = min(acct.get("reported_s_ago", 0.0), POLL_S + REPORT_SLACK_S)
                    w.spent_usd, w.seen = acct["spent_usd"], now - ago_s
                live = self._estimate(w, now)
                if live >= acct["ceiling_usd"] + margin and trial_id not in self.control.revoked:
                    self.control.revoked.add(trial_id)
                    to_revoke.append(trial_id)
                if live >= acct["ceiling_usd"] + margin + grace:
                    w.killed_usd = max(live, acct["ceiling_usd"])
                    to_kill.append((trial_id, w))
        for trial_id in to_revoke:
            remote.call(self.ledger.revoke, trial_id, timeout_s=10.0)
        for trial_id, w in to_kill:
            self.kills.append(trial_id)
            remote.call(self.ledger.update, trial_id, w.killed_usd, timeout_s=10.0)
            w.kill()

    def kill_all(self) -> None:
        """Kill every watched trial not killed yet (the sweep is stopping on an error)."""
        with self._lock:
            watched = list(self._watched.items())
        now = time.monotonic()
        for trial_id, w in watched:
            if w.killed_usd is None:
                w.killed_usd = self._estimate(w, now)
                self.kills.append(trial_id)
                w.kill()
