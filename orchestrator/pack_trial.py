"""One trial run as a slot of a shared pack (``orchestrator/pack_host.py``): the loop of
``workers.train.run_trial`` (``workers.train.train_loop``, so the same budget semantics), with
the model's work, a step and a closing, done by the pack (:class:`_Slot`).

setup (join) -> for each interval: ask the grant for it -> steps while one more step and the
closing fit under the ceiling -> close (eval, adapter, report) -> leave. The trial's bill is its
slot's share of the pack's held seconds (``HoldBilling``), read back from the host after every
step and closing, so the money checks use the slot's *billed* seconds per step and per closing
(what the trial pays for them in a pack), not wall time. A revoked grant stops it before its next
step without a closing; a closing sweep stops it there, with its closing, status
``interrupted``. A trial whose step gives a non-finite loss fails (``NonFiniteLoss``) and leaves.

Not packed, and refused here (``PackError``): full fine-tuning and DoRA (they run unpacked), a
retried attempt resuming from a checkpoint (the pack keeps no per-slot optimizer checkpoint yet:
the retry fails instead of training again from step 0 under the same trial id).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class PackHostLost(Exception):
    """The pack's host died under the trial (the watchdog stops a hung pack; or its process or
    node was lost): the trial fails, saying so."""


class _Host:
    """Calls to a :class:`PackHost` or to its Ray actor, alike."""

    def __init__(self, host) -> None:
        self.host = host

    def __getattr__(self, name: str):
        method = getattr(self.host, name)
        if hasattr(method, "remote"):
            import ray

            def call(*args):
                try:
                    return ray.get(method.remote(*args))
                except ray.exceptions.RayActorError as exc:
                    raise PackHostLost(
                        f"the pack's host is gone (during {name}): the watchdog stops a pack "
                        "whose step hung past its slots' grants, or its process was lost; "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    ) from exc

            return call
        return method


@dataclass
class PackClock:
    """A packed trial's billed time: what its slot was billed (``observe``d after each call to
    the host), on top of what earlier attempts billed; the same interface as the unpacked
    trial's clock (``billed_s``, ``cost_usd(extra_s)``, ``phases_s``)."""

    price_usd_per_hour: float
    prior_s: float = 0.0
    slot_s: float = 0.0
    phases_s: dict = field(default_factory=lambda: dict.fromkeys(("load", "step", "eval"), 0.0))

    def observe(self, billed_s: float, phase: str) -> float:
        """Record the slot's bill now; returns the seconds billed since the last observation."""
        delta = max(0.0, billed_s - self.slot_s)
        self.slot_s = max(self.slot_s, billed_s)
        self.phases_s[phase] = self.phases_s.get(phase, 0.0) + delta
        return delta

    @property
    def billed_s(self) -> float:
        return self.prior_s + self.slot_s

    def cost_usd(self, extra_s: float = 0.0) -> float:
        return self.price_usd_per_hour * (self.billed_s + extra_s) / 3600.0


def run_packed_trial(
    cfg,
    trial_id: str,
    host,
    report: Callable[[dict, Path], None],
    budget=None,
    clock: PackClock | None = None,
    resume_from: Path | None = None,
) -> dict:
    """Train ``cfg`` (a ``workers.train.TrialConfig``) as a slot of ``host``; calls
    ``report(metrics, adapter_dir)`` after every eval and returns the last metrics, as
    ``run_trial`` does (the same loop: ``workers.train.train_loop``). ``clock``: pass one to read
    the live bill (heartbeats) while it runs."""
    from workers.packed import PackError
    from workers.train import FixedBudget, _startup_fits, _unpaid_metrics, train_loop

    if resume_from is not None:
        raise PackError(
            "a packed trial cannot resume from its checkpoint yet: it fails instead of training "
            "again from step 0 (resources.pack_slots: 1 runs trials that resume)"
        )
    host = _Host(host)
    clock = clock or PackClock(cfg.price_usd_per_hour, cfg.prior_billed_s)
    budget = budget or FixedBudget()
    if not _startup_fits(cfg, clock, budget, startup_s=0.0):  # the pack holds the base: no load
        return _unpaid_metrics(clock, "budget_stopped")
    host.join(trial_id, cfg)
    try:
        _ask_for_the_owed(cfg, clock, budget, host.unbilled_s())
        return train_loop(cfg, clock, budget, report, _Slot(trial_id, host, clock))
    finally:
        try:
            clock.observe(host.leave(trial_id), "eval")
        except PackHostLost:  # its slot went with the host: the watchdog billed it
            pass


def _ask_for_the_owed(cfg, clock: PackClock, budget, owed_s: float) -> None:
    """Before its first step a slot asks its grant for the pack's held seconds no slot paid yet
    (the base's load, for the first slots), which that step bills to it, on top of its first
    interval: the watchdog reads the step's bill while it runs, and a grant that never saw the
    load would have it revoked and killed inside its first step. Refused (no room under the
    cap), it trains on while the ceiling allows, as ``train_loop`` does."""
    from workers.train import _needed_usd

    first = min(cfg.eval_every, cfg.max_steps)
    need = _needed_usd(clock, first, cfg.prior_step_s, 1, cfg.prior_closing_s, cfg.release_s)
    need += clock.cost_usd(owed_s) - clock.cost_usd()
    if owed_s > 0 and need > budget.ceiling_usd:
        budget.request(need)


@dataclass
class _Slot:
    """:class:`workers.train.Work` of a packed trial: its pack host steps and closes its slot;
    the seconds are what the slot was billed for them (``PackClock.observe``)."""

    trial_id: str
    host: _Host
    clock: PackClock

    def step(self, step: int) -> tuple[float, int, float | None]:
        from workers.train import NonFiniteLoss

        result = self.host.step(self.trial_id)
        if not math.isfinite(result["loss"]):
            raise NonFiniteLoss(f"loss is {result['loss']} at step {step + 1}: the trial failed")
        # the first step's bill carries the pack's unpaid seconds (its load, for the first
        # slots): a load, not a step time to plan the next steps by
        dt = self.clock.observe(result["billed_s"], "load" if step == 0 else "step")
        return result["loss"], result["tokens"], None if step == 0 else dt

    def close(self, out_dir: Path, step: int, tokens: int, step_s: float) -> tuple[dict, float]:
        closed = self.host.close(self.trial_id)
        closing_s = self.clock.observe(closed.pop("billed_s"), "eval")
        for name, data in closed.pop("files").items():
            (out_dir / name).write_bytes(data)
        return {**closed, "packed": 1}, closing_s

    def reported(self, seconds: float) -> None:
        """The report's seconds are the host's, billed to the slots by their tokens."""
