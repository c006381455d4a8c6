"""One trial run as a slot of a shared pack (``orchestrator/pack_host.py``): the same loop and
budget semantics as ``workers.train.run_trial``, with the model's work done by the pack.

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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class _Host:
    """Calls to a :class:`PackHost` or to its Ray actor, alike."""

    def __init__(self, host) -> None:
        self.host = host

    def __getattr__(self, name: str):
        method = getattr(self.host, name)
        if hasattr(method, "remote"):
            import ray

            return lambda *args: ray.get(method.remote(*args))
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
    ``run_trial`` does. ``clock``: pass one to read the live bill (heartbeats) while it runs."""
    from workers.packed import PackError
    from workers.train import FixedBudget, _unpaid_metrics

    if resume_from is not None:
        raise PackError(
            "a packed trial cannot resume from its checkpoint yet: it fails instead of training "
            "again from step 0 (resources.pack_slots: 1 runs trials that resume)"
        )
    host = _Host(host)
    clock = clock or PackClock(cfg.price_usd_per_hour, cfg.prior_billed_s)
    budget = budget or FixedBudget()
    if not _fits(clock, 1, cfg.prior_step_s, 1, cfg.prior_closing_s, cfg.release_s, budget):
        return _unpaid_metrics(clock, "budget_stopped")
    host.join(trial_id, cfg)
    try:
        return _train(cfg, trial_id, host, report, budget, clock)
    finally:
        clock.observe(host.leave(trial_id), "eval")


def _needed_usd(clock: PackClock, steps: int, step_s, closings: int, closing_s, release_s):
    from workers.train import SAFETY

    return clock.cost_usd(SAFETY * (steps * step_s + closings * closing_s + release_s))


def _fits(clock, steps, step_s, closings, closing_s, release_s, budget) -> bool:
    need = _needed_usd(clock, steps, step_s, closings, closing_s, release_s)
    return need <= budget.ceiling_usd or budget.request(need)


def _train(cfg, trial_id: str, host: _Host, report, budget, clock: PackClock) -> dict:
    from workers.train import CLOSING, NonFiniteLoss, _closed

    step = tokens = 0
    step_s, closing_s = cfg.prior_step_s, cfg.prior_closing_s  # billed seconds, once measured
    losses, metrics, status = [], {}, "completed"
    revoked = False
    if hasattr(budget, "loading"):
        budget.loading = False  # the slot is in: from here the trial asks for what it needs
    while step < cfg.max_steps:
        interval = min(cfg.eval_every - step % cfg.eval_every, cfg.max_steps - step)
        need = _needed_usd(clock, interval, step_s, 1, closing_s, cfg.release_s)
        if need > budget.ceiling_usd:
            budget.request(need)  # if refused, train on while the ceiling allows, then close
        start_step = step
        for i in range(interval):
            revoked = bool(getattr(budget, "revoked", False))
            if getattr(budget, "closing", False) and not revoked:
                status = "interrupted"
                break
            one = _needed_usd(clock, 1, step_s, 1, closing_s, cfg.release_s)
            if revoked or (
                one > budget.ceiling_usd
                and not budget.request(
                    _needed_usd(clock, interval - i, step_s, 1, closing_s, cfg.release_s)
                )
            ):
                status = "budget_stopped"
                break
            result = host.step(trial_id)
            if not math.isfinite(result["loss"]):
                raise NonFiniteLoss(
                    f"loss is {result['loss']} at step {step + 1}: the trial failed"
                )
            # the first step's bill carries the pack's unpaid seconds (its load, for the first
            # slots): a load, not a step time to plan the next steps by
            dt = clock.observe(result["billed_s"], "load" if step == 0 else "step")
            if step > 0:
                step_s = dt if step == 1 else 0.7 * step_s + 0.3 * dt
            step += 1
            tokens += result["tokens"]
            losses.append((step, result["loss"]))
        if revoked or step == start_step:
            return _closed(metrics, clock, status, step, tokens)
        if status not in CLOSING and step < cfg.max_steps:
            nxt = min(cfg.eval_every, cfg.max_steps - step)
            if not _fits(clock, nxt, step_s, 2, closing_s, cfg.release_s, budget) and (
                _needed_usd(clock, 1, step_s, 2, closing_s, cfg.release_s) > budget.ceiling_usd
            ):
                status = "budget_stopped"  # this eval is the last: say so in its report
        closed = host.close(trial_id)
        closing_s = clock.observe(closed.pop("billed_s"), "eval")
        files = closed.pop("files")
        done = status in CLOSING or step >= cfg.max_steps
        # the steps since the last report (a close between evals trained fewer than interval)
        since = [(s, v) for s, v in losses if s > start_step]
        interval_losses = [v for _, v in since]
        metrics = {
            **closed,
            "step": step,
            "train_loss": sum(interval_losses) / max(1, len(interval_losses)),
            "train_loss_steps": [[s, round(v, 5)] for s, v in since],
            "tokens": tokens,
            "billed_s": clock.billed_s,
            "cost_usd": clock.cost_usd(),
            "status": status if done else "running",
            "phases_s": {k: round(v, 3) for k, v in clock.phases_s.items()},
            "step_s": step_s,
            "closing_s": closing_s,
            "packed": 1,
        }
        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            report(metrics, Path(tmp))
        if status in CLOSING:
            break
    return metrics or _closed(metrics, clock, status, step, tokens)
