"""Retrying with exponential backoff: one helper for the ledger store, the sweep's actors and
MLflow."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def with_backoff(
    work: Callable[[], T],
    *,
    tries: int,
    first_s: float,
    cap_s: float = math.inf,
    again: Callable[[Exception], bool] = lambda exc: True,
    giveup: Callable[[Exception, int], Exception | None] | None = None,
) -> T:
    """``work()``, called again after ``first_s``, then twice as long each time (at most
    ``cap_s``), while it raises an error for which ``again(error)`` holds, ``tries`` times in all.
    The last error is raised, or what ``giveup(error, attempts)`` returns instead (chained to
    it) when that is not None."""
    delay_s = first_s
    for attempt in range(1, tries + 1):
        try:
            return work()
        except Exception as exc:
            if attempt == tries or not again(exc):
                instead = giveup(exc, attempt) if giveup else None
                if instead is None:
                    raise
                raise instead from exc
        time.sleep(delay_s)
        delay_s = min(2 * delay_s, cap_s)
    raise AssertionError("unreachable")
