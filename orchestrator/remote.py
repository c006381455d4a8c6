"""Calls from the driver and the trials to the sweep's actors, always with a timeout.

A ``ray.get`` without one waits forever on a hung or lost actor, and a wait the sweep cannot see
the end of is time it cannot bill or stop. Transient failures (an actor restarting) are retried
with backoff; what still fails is raised as :class:`ActorUnavailable`, one line naming the cause.
"""

from __future__ import annotations

import time

from orchestrator.errors import LorasweepError

TIMEOUT_S = 30.0  # one call, including a ledger actor's restart and reload from SQL
TRIES = 3


class ActorUnavailable(LorasweepError):
    """A sweep actor (the ledger) did not answer in time, or died and did not come back."""


def call(method, *args, timeout_s: float = TIMEOUT_S, tries: int = TRIES, **kwargs):
    """``ray.get(method.remote(*args, **kwargs))`` with a timeout and retries; ``method`` is an
    actor method handle such as ``ledger.snapshot``."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    delay_s = 0.5
    for attempt in range(1, tries + 1):
        try:
            return ray.get(method.remote(*args, **kwargs), timeout=timeout_s)
        except (GetTimeoutError, RayActorError) as exc:
            if attempt == tries:
                name = getattr(method, "_method_name", "call")
                raise ActorUnavailable(
                    f"ledger: {name} failed {tries} times ({type(exc).__name__}); the sweep "
                    "stopped with its accounts settled"
                ) from exc
            time.sleep(delay_s)
            delay_s *= 2
    raise AssertionError("unreachable")
