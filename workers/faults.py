"""Fault injection for tests and ``bench/fault_injection.py``; off unless a trial sets ``fault``.

A fault is ``KIND@STEP`` (several joined by ``,``): ``hang@3`` sleeps ``HANG_S`` inside step 3
(a hung kernel, NCCL wait or dead filesystem, as the watchdog sees it), ``nan@3`` makes step 3's
loss NaN. The sweep driver passes the environment variable ``LORASWEEP_FAULT`` to every trial.
"""

from __future__ import annotations

import time

HANG_S = 600.0


def _at(fault: str | None, kind: str, step: int) -> bool:
    if not fault:
        return False
    return any(part.strip() == f"{kind}@{step}" for part in fault.split(","))


def before_step(fault: str | None, step: int) -> None:
    """Hang inside the step when asked to."""
    if _at(fault, "hang", step):
        time.sleep(HANG_S)


def loss(fault: str | None, step: int, value: float) -> float:
    """The step's loss, or NaN when asked to."""
    return float("nan") if _at(fault, "nan", step) else value
