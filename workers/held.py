"""When a Ray worker process started holding its resources, on its own monotonic clock.

A worker process that is young when our code first runs in it was started by Ray for the lease
it serves (lorasweep's local clusters keep no idle pool): its start-up, and Ray's and Tune's imports
before ours, are held time. An older one idled in a pool before the lease: it holds from when our
code loaded. Light on purpose: imported first, before torch.
"""

from __future__ import annotations

import os
import time

FRESH_WORKER_S = 30.0  # a worker process this young when our code loads was started for its lease


def process_age_s() -> float | None:
    """Seconds since this process started, to the kernel's tick (``/proc``; psutil elsewhere,
    whose start time is only as exact as the whole second the boot time is kept to)."""
    try:
        with open("/proc/self/stat") as f:  # field 22, after the parenthesised command name
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no process table at all
        return None


def held_since(loaded: float) -> float:
    """``loaded`` (a ``time.monotonic()`` reading as our code loaded) or the process's start."""
    age_s = process_age_s()
    if age_s is None or not 0.0 <= age_s <= FRESH_WORKER_S:
        return loaded
    return loaded - age_s
