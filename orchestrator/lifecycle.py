"""The life of a sweep in SQL: ``queued -> running -> completed | failed | cancelled |
interrupted``, recorded on its row in the ledger's store, with the driver's heartbeat.

A sweep is identified by its id, not by the process running it: a driver writes its heartbeat
every ``DRIVER_HEARTBEAT_S``; a ``running`` sweep whose heartbeat is older than ``STALE_S`` lost
its driver without a word (SIGKILL, a reboot) and is shown as ``interrupted``, to be resumed
(``lorasweep resume``) or abandoned (``lorasweep abandon``).
"""

from __future__ import annotations

import os
import threading
import time

from orchestrator.errors import LorasweepError
from orchestrator.prices import cost_usd

# often: a dead driver's open accounts are priced to its last beat + this, so it is what a crash
# can over-bill each of them (the fault bench saw ~0.4 s per account at 1 s); a cheap row update
DRIVER_HEARTBEAT_S = 0.25
# after a driver's death, until Ray has stopped its trial actors: measured on this project's
# machines, Ray ended a SIGKILLed driver's actors 0.05-0.09 s after it, on a local cluster and on
# a `ray start` one alike
DEAD_DRIVER_TEARDOWN_S = 0.1
DRIVER_DEATH_S = DRIVER_HEARTBEAT_S + DEAD_DRIVER_TEARDOWN_S  # after its last beat, at the latest
# a ledger write this long after the driver's last beat means its beats stalled (a busy process),
# not that it died a period after that beat
DRIVER_STALL_S = 1.0
HEARTBEAT_DELIVERY_S = 0.5  # a trial's heartbeat, sent, until the ledger has written it
# a running sweep's driver is taken for dead after this long without a heartbeat (tests shorten it)
STALE_S = float(os.environ.get("LORASWEEP_DRIVER_STALE_S", "30"))
UNFINISHED = ("queued", "running", "interrupted")


def effective_state(row, now: float | None = None) -> str:
    """The sweep's state as a user should see it: a running sweep without a live driver is
    ``interrupted``."""
    state = row.state or "completed"  # rows of the first release recorded no state
    beat = row.driver_heartbeat_unix
    now = time.time() if now is None else now
    if state == "running" and (beat is None or now - beat > STALE_S):
        return "interrupted"
    return state


def refuse_unfinished(store, name: str) -> None:
    """``lorasweep run`` on a spec whose latest sweep is unfinished: resume it or start anew."""
    row = store.latest_sweep(name)
    if row is None:
        return
    state = effective_state(row)
    if state == "running":
        raise LorasweepError(
            f"SPEC: sweep {row.sweep_id} of {name!r} is running (its driver is alive); watch it "
            f"with lorasweep status {row.sweep_id}, or pass --new to start a separate sweep"
        )
    if state in UNFINISHED:
        raise LorasweepError(
            f"SPEC: the latest sweep of {name!r}, {row.sweep_id}, is {state}: continue it with "
            f"lorasweep resume {row.sweep_id}, or pass --new to start a separate sweep with its "
            "own cap"
        )


def crash_settlements(store, sweep_id: str, price_usd_per_hour: float) -> dict[str, float]:
    """What each account left open by a dead driver spent: its last heartbeat (or, started and
    not yet beating, its start) plus the time until the crash, never below what it reported.
    The trials died with the driver (Tune's actors are its own), at a time no later than
    :func:`crash_bound_unix` says."""
    row = store.sweep(sweep_id)
    beat = row.driver_heartbeat_unix if row is not None else None
    open_accounts = [a for a in store.accounts(sweep_id) if not (a.settled or a.charge)]
    crash_unix = crash_bound_unix(beat, [a.updated_unix for a in open_accounts])
    out = {}
    for acct in open_accounts:
        if acct.spent_usd > 0:  # from its last heartbeat
            since = acct.updated_unix
        elif acct.started_unix is not None:  # started, loading, no heartbeat yet: from its start
            since = acct.started_unix
        else:  # reserved, never started
            since = crash_unix
        out[acct.key] = acct.spent_usd + cost_usd(price_usd_per_hour, max(0.0, crash_unix - since))
    return out


def crash_bound_unix(beat_unix: float | None, updates_unix: list[float]) -> float:
    """The latest a dead driver (and its trials, and its ledger) can have died: one period after
    its last heartbeat plus Ray's teardown of its actors; or, while its trials were beating into
    the ledger (a write since, or less than a trial heartbeat before), one trial heartbeat plus
    its delivery after the ledger's last write, if that is sooner. Never before either's last
    sign of life."""
    from orchestrator.watchdog import HEARTBEAT_S

    beat_s = HEARTBEAT_S + HEARTBEAT_DELIVERY_S
    latest = max([u for u in updates_unix if u is not None], default=0.0)
    if beat_unix is None or latest > beat_unix + DRIVER_STALL_S:
        return latest + beat_s  # no driver beat (an old row), or its beats stalled before
    if latest >= beat_unix - beat_s:  # the trials beat until the driver's last beat, or later
        return max(latest, min(beat_unix + DRIVER_DEATH_S, latest + beat_s))
    return beat_unix + DRIVER_DEATH_S


class DriverHeartbeat:
    """Writes the driver's heartbeat on the sweep's row every ``DRIVER_HEARTBEAT_S``."""

    def __init__(self, store, sweep_id: str) -> None:
        self.store, self.sweep_id = store, sweep_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorasweep-driver", daemon=True)

    def __enter__(self) -> DriverHeartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        self.store.set_sweep(self.sweep_id, driver_heartbeat_unix=time.time())

    def _run(self) -> None:
        while not self._stop.wait(DRIVER_HEARTBEAT_S):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next period
                pass
