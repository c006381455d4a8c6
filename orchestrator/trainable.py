"""The Ray Tune function trainable: glue between Tune, the budget ledger and ``workers.train``.

Billing starts when the trial's worker holds its resources: for the first trial of a worker
process, when the process started or when Tune's actor loaded this module (``workers/held.py``:
a young process was started by Ray for this trial's lease); for a later trial of a reused actor,
when the previous trial in the process gave its last word, so the seconds a kept actor holds
its resources while the search decides are billed too (to the next trial). All on this process's
``time.monotonic()``. While the trial runs, a heartbeat thread sends its billed cost to the
ledger every ``HEARTBEAT_S`` and picks up a revoked grant.

A retried trial (its worker was lost; Tune's ``FailureConfig`` starts it again) continues from its
last checkpoint (``tune.get_checkpoint()``, see ``workers/train.py``), and its clock starts from
what the earlier attempts billed: the more of the ledger's record of the trial's spend (its last
heartbeat) and the checkpoint's billed seconds. Reports and heartbeats are the trial's whole cost,
so the ledger (which keeps the highest) counts the lost attempt once.
"""

from __future__ import annotations

import os
import time

from orchestrator.actor_spans import record_birth  # light, as is workers.held
from workers.held import held_since  # light: the clock below starts before the heavy imports

_HELD_SINCE = held_since(time.monotonic())
_released_at: float | None = None  # when this process's previous trial returned
_WORKER = f"{os.uname().nodename}:{os.getpid()}"  # this process, as the ledger tells them apart
# in a Tune actor: its birth, before the heavy imports below (an actor can die loading them),
# for the time it holds outside every trial's bill (orchestrator/actor_spans.py)
_BIRTH_RECORDED = record_birth(_WORKER, time.time() - (time.monotonic() - _HELD_SINCE))

import contextlib  # noqa: E402 - after the clock above, which must start first
import dataclasses  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from orchestrator import remote  # noqa: E402
from orchestrator.costmodel import PRIOR_RELEASE_S  # noqa: E402
from orchestrator.pack_trial import PackClock, run_packed_trial  # noqa: E402
from orchestrator.prices import cost_usd  # noqa: E402
from orchestrator.spec import HYPERPARAMETERS  # noqa: E402
from orchestrator.system_metrics import SystemSampler  # noqa: E402
from orchestrator.watchdog import HEARTBEAT_S  # noqa: E402
from workers.train import TrialConfig, checkpoint_billed_s, run_trial  # noqa: E402

STARTUP_SLACK = 3.0  # a trial's startup may take this many times its prediction ...
STARTUP_MIN_S = 60.0  # ... or at least this long, before its load counts as hung
LOADING_AHEAD_S = 3 * HEARTBEAT_S + 2.0  # the grant is kept this far ahead while loading


class LedgerBudget:
    """A trial's view of the sweep's ledger actor: its ceiling, raised on request, and a
    heartbeat thread that reports its live cost and learns when the grant is revoked or the
    sweep is closing."""

    def __init__(
        self,
        ledger,
        trial_id: str,
        price_usd_per_hour: float,
        t0: float,
        prior_s: float = 0.0,
        predicted_startup_s: float = 0.0,
        cost_of=None,
    ) -> None:
        self.ledger, self.trial_id = ledger, trial_id
        # a packed trial's cost is its slot's share of the pack's held time (pack_trial.py)
        self._cost_of = cost_of
        self.ended_at: float | None = None  # when its last word was priced (``__exit__``)
        self.price_usd_per_hour, self.t0 = price_usd_per_hour, t0
        self.prior_s = prior_s  # billed by the trial's earlier attempts
        self.ceiling_usd = remote.call(ledger.ceiling, trial_id)
        # until its first step the trial cannot ask for more itself (it is loading): the
        # heartbeat keeps its grant ahead of its spend, up to STARTUP_SLACK x the predicted
        # startup (a slow node, a cold cache); a load that hangs past that is still killed
        self.loading = True
        self.startup_cap_usd = self.ceiling_usd + cost_usd(
            price_usd_per_hour, max(STARTUP_SLACK * predicted_startup_s, STARTUP_MIN_S)
        )
        self.revoked = False
        self.closing = False  # the sweep is closing: close at the next step, inside the grant
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lorasweep-heartbeat", daemon=True)

    def request(self, total_usd: float) -> bool:
        if self.revoked:
            return False
        if remote.call(self.ledger.request, self.trial_id, total_usd):
            self.ceiling_usd = total_usd
            return True
        return False

    def cost_usd(self, at: float | None = None) -> float:
        """Billed so far, or up to ``at`` (this process's monotonic time)."""
        if self._cost_of is not None:
            return self._cost_of()
        now = time.monotonic() if at is None else at
        return cost_usd(self.price_usd_per_hour, self.prior_s + now - self.t0)

    def __enter__(self) -> LedgerBudget:
        try:
            remote.call(self.ledger.began, self.trial_id, _worker(), tries=1)
        except remote.ActorUnavailable:
            pass  # the heartbeat's silence tells the watchdog
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        # the last word: what the trial cost up to here, and which process ran it; the next
        # trial of this process bills from this same instant (``ended_at``)
        self.ended_at = time.monotonic()
        try:
            cost = self.cost_usd(self.ended_at)
            remote.call(self.ledger.last_word, self.trial_id, cost, _worker(), tries=1)
        except remote.ActorUnavailable:
            pass  # settled by the driver from its own clock

    def _keep_ahead_while_loading(self) -> None:
        ahead_usd = self.cost_usd() + cost_usd(self.price_usd_per_hour, LOADING_AHEAD_S)
        if self.closing or self.revoked:
            return  # the sweep is closing: a load that outlasts its grant is not extended
        if self.loading and self.ceiling_usd < ahead_usd <= self.startup_cap_usd:
            self.request(ahead_usd)

    def _beat(self) -> None:
        """At once (what a reused worker held before this trial shows up right away), then every
        ``HEARTBEAT_S`` until the trial ends."""
        while True:
            try:
                self._keep_ahead_while_loading()
                remote.call(self.ledger.update, self.trial_id, self.cost_usd(), tries=1)
                standing = remote.call(self.ledger.standing, self.trial_id, tries=1)
                self.revoked = self.revoked or standing == "revoked"
                self.closing = self.closing or standing == "closing"
            except Exception:  # noqa: BLE001 - keep beating; the watchdog sees any silence
                pass
            if self._stop.wait(HEARTBEAT_S):
                return


def _worker() -> str:
    """This worker process, as the ledger tells processes apart."""
    return _WORKER


def _failure(exc: BaseException, budget: LedgerBudget) -> dict:
    """A trial that failed in its own code (a NaN loss, out of memory, an exception) reports it
    and ends, rather than raising: Tune retries raised errors from the last checkpoint
    (``FailureConfig``), which is for lost workers, not for a config that fails again."""
    cost = budget.cost_usd()
    return {
        "trial_status": "failed",
        "error": f"{type(exc).__name__}: {exc}"[:1000],
        "cost_usd": cost,
        "billed_s": cost / budget.price_usd_per_hour * 3600 if budget.price_usd_per_hour else 0.0,
    }


def _billing_start() -> float:
    return _released_at if _released_at is not None else _HELD_SINCE


def _prior_billed_s(ledger, trial_id: str, price_usd_per_hour: float, resume: Path | None) -> float:
    """Seconds the trial's earlier attempts billed: the more of the ledger's record of its spend
    (0 for a first attempt; settled or not) and its checkpoint's billed seconds."""
    spent_usd = float(remote.call(ledger.spent, trial_id))
    ledger_s = spent_usd * 3600.0 / price_usd_per_hour if price_usd_per_hour > 0 else 0.0
    return max(ledger_s, checkpoint_billed_s(resume) if resume is not None else 0.0)


def train_lorasweep(config: dict, *, base: dict, ledger, pack=None) -> None:
    """Run one trial of the sweep; ``base`` holds the TrialConfig fields the spec fixes; ``pack``:
    the phase's pack host, when the trial runs as one of its slots (``pack_sweep.py``)."""
    global _released_at
    import ray
    from ray import tune

    t0 = _billing_start()
    trial_id = tune.get_context().get_trial_id()
    timings = remote.call(ledger.get_timings)
    hyper = {k: config[k] for k in HYPERPARAMETERS if k in config}
    hyper["loraplus_lr_ratio"] = hyper.get("loraplus_lr_ratio") or None
    if hyper.get("method") == "full":  # the search samples LoRA-scale lrs; full FT wants ~10x less
        hyper["learning_rate"] *= config.get("full_lr_scale", 1.0)
    memory = {k: config[k] for k in ("gradient_checkpointing", "micro_batch") if k in config}
    cfg = TrialConfig(
        **{
            **base,
            **hyper,
            **memory,
            # the admission's predictions for this config, until the trial measures its own
            "prior_step_s": config.get("predicted_step_s", base.get("prior_step_s", 5.0)),
            "prior_closing_s": config.get("predicted_closing_s", base.get("prior_closing_s", 30.0)),
            "prior_startup_s": config.get("predicted_startup_s", 0.0),
            "release_s": timings.get("release_s", base.get("release_s", PRIOR_RELEASE_S)),
            "billing_start_monotonic": t0,
        }
    )

    # the Ray node this trial runs on: the driver tags its MLflow child run with it (a cluster's
    # runs say which node did the work; cluster-smoke checks trials landed on the worker node)
    node_id = ray.get_runtime_context().get_node_id()
    # CPU, memory and GPU use while the trial runs, sent with each report (MLflow's system/...)
    sampler = SystemSampler()

    def report(metrics: dict, adapter_dir: Path) -> None:
        metrics = {
            **metrics,
            "trial_status": metrics.pop("status"),
            "ray_node_id": node_id,
            "system_metrics": sampler.drain(),
        }
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(adapter_dir)))

    checkpoint = tune.get_checkpoint()  # set when Tune retries the trial after a lost worker
    budget = None
    try:
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir:
            resume = Path(resume_dir) if resume_dir else None
            prior_s = _prior_billed_s(ledger, trial_id, cfg.price_usd_per_hour, resume)
            sampler.continue_after(prior_s)  # a retry's samples do not repeat the lost steps
            cfg = dataclasses.replace(cfg, prior_billed_s=prior_s)
            clock = None if pack is None else PackClock(cfg.price_usd_per_hour, prior_s)
            # a trial refused before training reports nothing: its bill is its last heartbeat
            # the sampler stops inside the grant (before the last word): its end is billed
            with (
                LedgerBudget(
                    ledger,
                    trial_id,
                    cfg.price_usd_per_hour,
                    t0,
                    prior_s,
                    cfg.prior_startup_s,
                    cost_of=None if clock is None else clock.cost_usd,
                ) as budget,
                sampler,
            ):
                try:
                    if pack is None:
                        run_trial(cfg, report, budget, resume_from=resume)
                    else:
                        run_packed_trial(cfg, trial_id, pack, report, budget, clock, resume)
                except Exception as exc:  # noqa: BLE001 - a failed trial, reported as such
                    tune.report(_failure(exc, budget))
    finally:  # the next trial here bills from this one's last word (or from now, if none)
        ended_at = budget.ended_at if budget is not None else None
        _released_at = ended_at if ended_at is not None else time.monotonic()
