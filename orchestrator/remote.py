"""Calls from the driver and the trials to the sweep's actors, always with a timeout.

A ``ray.get`` without one waits forever on a hung or lost actor, and a wait the sweep cannot see
the end of is time it cannot bill or stop. Transient failures (an actor restarting) are retried
with backoff; what still fails is raised as :class:`ActorUnavailable`, one line naming the cause.
"""

from __future__ import annotations

from orchestrator.errors import LorasweepError
from orchestrator.retry import with_backoff

TIMEOUT_S = 30.0  # one call, including a ledger actor's restart and reload from SQL
TRIES = 3


class ActorUnavailable(LorasweepError):
    """A sweep actor (the ledger) did not answer in time, or died and did not come back."""


def call(method, *args, timeout_s: float = TIMEOUT_S, tries: int = TRIES, **kwargs):
    """``ray.get(method.remote(*args, **kwargs))`` with a timeout and retries; ``method`` is an
    actor method handle such as ``ledger.snapshot``."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    def giveup(exc: Exception, attempts: int) -> Exception | None:
        if not isinstance(exc, GetTimeoutError | RayActorError):
            return None
        name = getattr(method, "_method_name", "call")
        return ActorUnavailable(
            f"ledger: {name} failed {attempts} times ({type(exc).__name__}); the sweep stopped "
            "with its accounts settled"
        )

    return with_backoff(
        lambda: ray.get(method.remote(*args, **kwargs), timeout=timeout_s),
        tries=tries,
        first_s=0.5,
        again=lambda exc: isinstance(exc, GetTimeoutError | RayActorError),
        giveup=giveup,
    )


class ActorRef:
    """A named actor, found by name in whichever process uses it. Pickled (into Tune's experiment
    folder with the searcher, the trainable's parameters and the callback) it is only the name,
    so a sweep resumed by a new driver reaches the new driver's actor of the same name, where a
    pickled handle would reach the dead one. ``ref.snapshot`` is the actor's method handle, as
    with a handle: ``call(ref.snapshot)``."""

    def __init__(self, name: str, handle=None) -> None:
        self.name = name
        self._handle = handle

    @property
    def handle(self):
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name)
        return self._handle

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return getattr(self.handle, method)

    def __getstate__(self) -> dict:
        return {"name": self.name, "_handle": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
