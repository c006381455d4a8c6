"""Spend measured from outside the system under test: the OS's view of Ray's worker processes.

A background thread polls this test's own descendant processes (Ray's local cluster started by
the test, or by a CLI the test ran, is its child; other sessions' Ray workers on the machine are
not) every ``POLL_S`` and records, per process, how long it carried the title of one of the
sweep's paid workers (Ray sets a worker's title to
``ray::<actor class or task>``: Tune's function trainable runs in ``ray::ImplicitFunc``, the base
eval in ``ray::score_split``). Held seconds x price is what a cloud would bill for them, whatever
the sweep's own ``cost_usd`` says.
"""

from __future__ import annotations

import threading
import time

import psutil

POLL_S = 0.1
PAID_TITLES = ("ray::ImplicitFunc", "ray::score_split", "ray::_Inner")


def own_processes() -> list[psutil.Process]:
    """This process's descendants (the Ray processes it, or a CLI it started, runs)."""
    return psutil.Process().children(recursive=True)


def title(proc: psutil.Process) -> str:
    """A process's title (Ray renames its workers ``ray::...``); "" once it is gone."""
    try:
        return (proc.cmdline() or [""])[0]
    except psutil.Error:
        return ""


def own_pids(prefix: str) -> set[int]:
    """This test's own processes whose title starts with ``prefix``."""
    return {p.pid for p in own_processes() if title(p).startswith(prefix)}


class ProcessMeter:
    """``with ProcessMeter() as meter: ...`` then ``meter.held_s()`` (sum over processes)."""

    def __init__(self) -> None:
        self.spans: dict[int, list[float]] = {}  # pid -> [first seen, last seen] (monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for proc in own_processes():
                if title(proc).startswith(PAID_TITLES):
                    span = self.spans.setdefault(proc.pid, [now, now])
                    span[1] = now
            self._stop.wait(POLL_S)

    def held_s(self) -> float:
        """Seconds the paid processes existed, each rounded up by one poll interval."""
        return sum(last - first + POLL_S for first, last in self.spans.values())

    def cost_usd(self, price_usd_per_hour: float) -> float:
        return price_usd_per_hour * self.held_s() / 3600.0
