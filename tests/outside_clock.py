"""Spend measured from outside the system under test: the OS's view of Ray's worker processes.

A background thread polls a set of processes (by default this test's own descendants: Ray's local
cluster started by the test, or by a CLI the test ran, is its child; other sessions' Ray workers
on the machine are not; ``bench/fault_injection.py`` passes its cluster's) every ``POLL_S`` and
records, per process, how long it held a paid lease: Ray titles a worker ``ray::<actor class or
task>`` while it serves one (Tune's function trainable runs in ``ray::ImplicitFunc``, the base eval
in ``ray::score_split``). A paid span runs to the last poll that shows the title, and starts at
the process's own start when Ray started it while the meter ran and it served nothing before
(no idle pool: Ray started it for this lease, and its start-up and Ray's and Tune's imports, shown
as ``ray::IDLE``, are held time), else at the first poll that shows the title. Held seconds x
price is what a cloud would bill for them, whatever the sweep's own ``cost_usd`` says.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import psutil

POLL_S = 0.1
PAID_TITLES = ("ray::ImplicitFunc", "ray::score_split", "ray::_Inner")
# a packed sweep's paid processes: the host holding the pack, and the base-model eval
PACKED_TITLES = ("ray::PackHost", "ray::score_split")


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


def _age_s(pid: int) -> float | None:
    """A process's age from the kernel, to its tick (psutil's start time is only as exact as
    the whole second the boot time is kept to)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ProcessMeter:
    """``with ProcessMeter() as meter: ...`` then ``meter.held_s()`` (sum over processes).

    ``source`` lists the processes to watch; ``titles`` are the paid ones' title prefixes (a
    meter's own: a module-wide setting changed by one user once miscounted the next test's);
    ``tag`` (set while it runs) is attributed to the spans that open from then on (the
    benchmark's sweep index)."""

    def __init__(
        self,
        source: Callable[[], list[psutil.Process]] = own_processes,
        titles: tuple[str, ...] = PAID_TITLES,
    ) -> None:
        self.source, self.titles = source, tuple(titles)
        self.tag = None
        self.spans: list[dict] = []  # {"pid", "title", "first", "last", "tag"} (monotonic)
        self._open: dict[tuple[int, float], dict] = {}  # the process's current paid span
        self._born: dict[tuple[int, float], float | None] = {}  # start, if while the meter ran
        self.live: dict[tuple[int, float], tuple[psutil.Process, dict]] = {}  # paid now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._since = time.monotonic()
        self.polls = 0  # walks of the process tree done, and the longest time between two
        self.max_gap_s = 0.0
        self.error: BaseException | None = None  # what ended the thread early, if anything

    def __enter__(self) -> ProcessMeter:
        self._since = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _key(self, proc: psutil.Process, now: float) -> tuple[int, float] | None:
        try:
            created_wall = proc.create_time()
        except psutil.Error:
            return None
        key = (proc.pid, created_wall)
        if key not in self._born:
            age_s = _age_s(proc.pid)
            born = now - (age_s if age_s is not None else time.time() - created_wall)
            self._born[key] = born if born >= self._since else None
        return key

    def _run(self) -> None:
        try:
            self._poll_until_stopped()
        except BaseException as exc:  # noqa: BLE001 - kept for the test's report
            self.error = exc
            raise

    def _poll_until_stopped(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            now, live = time.monotonic(), {}
            self.polls += 1
            self.max_gap_s = max(self.max_gap_s, now - last)
            last = now
            try:  # a process of the tree that went mid-walk: walk again at the next poll
                procs = self.source()
            except psutil.Error:
                self._stop.wait(POLL_S)
                continue
            for proc in procs:
                t = title(proc)
                key = self._key(proc, now)
                if key is None:
                    continue
                span = self._open.get(key)
                if not t.startswith(self.titles):
                    self._open.pop(key, None)  # back in a pool (a task's worker): span ends
                    continue
                if span is None:
                    born = self._born.get(key)  # its first lease: held since its start
                    span = {"pid": key[0], "title": t, "first": born or now, "tag": self.tag}
                    self._born[key] = None
                    self._open[key] = span
                    with self._lock:
                        self.spans.append(span)
                span["last"] = now
                live[key] = (proc, span)
            self._open = {k: s for k, s in self._open.items() if k in live}  # the gone ones end
            with self._lock:
                self.live = live
            self._stop.wait(POLL_S)

    def _chosen(self, tag) -> list[dict]:
        with self._lock:
            return [s for s in self.spans if tag is None or s["tag"] == tag]

    def held_s(self, tag=None) -> float:
        """Seconds the paid processes held (of spans tagged ``tag``, if given), each rounded up
        by one poll interval."""
        return sum(s["last"] - s["first"] + POLL_S for s in self._chosen(tag))

    def cost_usd(self, price_usd_per_hour: float, tag=None) -> float:
        return price_usd_per_hour * self.held_s(tag) / 3600.0

    def processes(self, tag=None) -> list[dict]:
        """Per span: pid, title and held seconds."""
        return [
            {
                "pid": s["pid"],
                "title": s["title"],
                "held_s": round(s["last"] - s["first"] + POLL_S, 2),
            }
            for s in self._chosen(tag)
        ]

    def health(self) -> dict:
        """How the meter itself fared: polls done, the longest gap between two, an error that
        ended it early: a meter that stalled or died under-measures, and says so here."""
        return {
            "polls": self.polls,
            "max_gap_s": round(self.max_gap_s, 2),
            "error": repr(self.error) if self.error else None,
            "alive": self._thread.is_alive(),
        }

    def running(self, prefix: str, min_age_s: float) -> list[psutil.Process]:
        """Live processes titled ``prefix...`` whose span is at least ``min_age_s`` old."""
        now = time.monotonic()
        with self._lock:
            live = list(self.live.values())
        return [
            p for p, s in live if s["title"].startswith(prefix) and now - s["first"] >= min_age_s
        ]
