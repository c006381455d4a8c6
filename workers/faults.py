"""Fault injection for tests and ``bench/fault_injection.py``; off unless a trial sets ``fault``.

A fault is ``KIND@STEP`` (several joined by ``,``): ``hang@3`` sleeps ``HANG_S`` inside step 3
(a hung kernel, NCCL wait or dead filesystem, as the watchdog sees it), ``nan@3`` makes step 3's
loss NaN, ``slow@3`` makes step 3 and every later one last at least ``SLOW_S`` (a slow GPU: a test
that must act while a trial trains gets the time to). The sweep driver passes the environment
variable ``LORASWEEP_FAULT`` to every trial.

Plain ``KIND@STEP`` hits every trial (and every retry) that reaches the step. ``KIND@STEPxN|DIR``
fires at most ``N`` times across the whole sweep, whichever trials and processes reach the step
first: each firing claims a token file ``DIR/KIND@STEP.I`` (``I`` < ``N``) created with
``O_CREAT|O_EXCL``, so processes on any node that sees ``DIR`` share the count (``DIR`` must not
hold ``,``). E.g. ``nan@3x1|/tmp/f,hang@5x1|/tmp/f``: one NaN, one hang, in the whole sweep.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

HANG_S = 600.0
SLOW_S = 1.0
KINDS = ("hang", "nan", "slow")
_PART = re.compile(r"^(?P<kind>[a-z]+)@(?P<step>\d+)(?:x(?P<times>\d+))?(?:\|(?P<dir>.+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    times: int | None = None  # None: every time the step is reached
    dir: str | None = None  # where the firings are counted (with ``times``)


def parse(fault: str | None) -> list[Fault]:
    """The faults a ``fault`` string asks for; ``ValueError`` naming the part that is wrong."""
    out: list[Fault] = []
    for raw in (fault or "").split(","):
        part = raw.strip()
        if not part:
            continue
        m = _PART.match(part)
        if m is None or m["kind"] not in KINDS:
            raise ValueError(f"fault {part!r}: expected KIND@STEP[xN|DIR], KIND one of {KINDS}")
        times = None if m["times"] is None else int(m["times"])
        directory = m["dir"].strip() if m["dir"] else None
        if (times is None) != (directory is None):
            raise ValueError(f"fault {part!r}: xN and |DIR go together (the count lives in DIR)")
        if times is not None and times < 1:
            raise ValueError(f"fault {part!r}: xN needs N >= 1")
        out.append(Fault(m["kind"], int(m["step"]), times, directory))
    return out


def _claim(f: Fault) -> bool:
    """Whether this firing of a counted fault is one of its ``times`` (claims a token file)."""
    if f.times is None:
        return True
    d = Path(f.dir)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(f.times):
        try:
            fd = os.open(d / f"{f.kind}@{f.step}.{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {time.time():.3f}\n")
        return True
    return False


def _at(fault: str | None, kind: str, step: int) -> bool:
    if not fault:
        return False
    return any(f.kind == kind and f.step == step and _claim(f) for f in parse(fault))


def before_step(fault: str | None, step: int) -> None:
    """Hang inside the step when asked to."""
    if _at(fault, "hang", step):
        time.sleep(HANG_S)
    if fault and any(f.kind == "slow" and step >= f.step for f in parse(fault)):
        time.sleep(SLOW_S)


def loss(fault: str | None, step: int, value: float) -> float:
    """The step's loss, or NaN when asked to."""
    return float("nan") if _at(fault, "nan", step) else value


def before_packed_step(slots: list[tuple[str | None, int]]) -> None:
    """A pack's step over several slots, each ``(fault, step)`` (its trial's fault string and
    the step it is about to take): the packed step hangs once if any slot asks for a hang at its
    step, and is slow once if any asks to be slow (one step of the pack, not one per slot). It is
    called inside the pack's step, holding its GPU: a hang there is a hung pack, every slot in it
    waits (``workers/packed.py``, ``orchestrator/pack_watchdog.py``)."""
    if any(_at(fault, "hang", step) for fault, step in slots):
        time.sleep(HANG_S)
    if any(
        fault and any(f.kind == "slow" and step >= f.step for f in parse(fault))
        for fault, step in slots
    ):
        time.sleep(SLOW_S)
