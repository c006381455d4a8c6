"""Spend measured from outside the system under test: the OS's view of Ray's worker processes.

A background thread polls the process table every ``POLL_S`` and records, per process, how long it
carried the title of one of the sweep's paid workers (Ray sets a worker's title to
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
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmd = proc.info.get("cmdline") or []
                if cmd and cmd[0].startswith(PAID_TITLES):
                    span = self.spans.setdefault(proc.info["pid"], [now, now])
                    span[1] = now
            self._stop.wait(POLL_S)

    def held_s(self) -> float:
        """Seconds the paid processes existed, each rounded up by one poll interval."""
        return sum(last - first + POLL_S for first, last in self.spans.values())

    def cost_usd(self, price_usd_per_hour: float) -> float:
        return price_usd_per_hour * self.held_s() / 3600.0
