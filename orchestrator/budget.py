"""The budget engine (first cut): a ledger that never lets commitments exceed the cap.

Every trial holds a *ceiling*: the most it may spend. The ledger grants ceilings only while

    sum over trials of max(ceiling, spent) + fixed charges <= cap_usd,

so the total spent can never pass the cap as long as each trial stays under its ceiling (the
worker checks that before every step, keeping room for a closing eval and save; see
``workers/train.py``). Admission reserves a new trial's ceiling up to its first early-stopping
rung; trials ask for more before each further interval and stop gracefully when refused.

Worst case overshoot: a trial's closing eval + save taking more than ``SAFETY`` (1.25x) its
measured duration, on the last interval before the cap. Tests and the demo measure zero.

The class is plain Python (unit-testable); the sweep runs it as a Ray actor so workers reach it.
With ``store_url`` every change is also written to SQL (``orchestrator/store.py``) as it happens,
so a crash loses nothing that was spent or reserved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Conservative throughput priors until a trial of this sweep has reported: effective FLOP/s per
# unit (core for cpu, GPU otherwise). Measured: SmolLM2-135M LoRA on 2 cores ~60 tok/s/core
# (=4.9e10 FLOP/s at 6N FLOPs/token); H100 0.5B LoRA 41k tok/s (1.2e14). Priors are half that.
PRIOR_FLOPS_PER_S = {"cpu": 2.5e10, "H100": 6e13, "H200": 6e13}
PRIOR_GPU_FLOPS_PER_S = 2e13
PRIOR_STARTUP_S = {"cpu": 15.0}  # actor start, imports, model load
PRIOR_GPU_STARTUP_S = 60.0


@dataclass
class TrialAccount:
    ceiling_usd: float
    spent_usd: float = 0.0
    started_unix: float | None = None
    settled: bool = False
    predicted_usd: float | None = None

    @property
    def committed_usd(self) -> float:
        return self.spent_usd if self.settled else max(self.ceiling_usd, self.spent_usd)


@dataclass
class Ledger:
    """Spend and commitments of one sweep, in US dollars."""

    cap_usd: float
    trials: dict[str, TrialAccount] = field(default_factory=dict)
    charges_usd: dict[str, float] = field(default_factory=dict)  # fixed spends (baseline eval)
    timings: dict[str, float] = field(default_factory=dict)  # calibrated step/closing/startup
    sweep_id: str = ""
    store_url: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self._store = None
        if self.store_url:
            from orchestrator.store import Store

            self._store = Store(self.store_url)
            self._store.create_sweep(self.sweep_id, self.name or self.sweep_id, self.cap_usd)

    def _persist(self, key: str, kind: str | None = None, predicted_usd: float | None = None):
        if self._store is None:
            return
        if key in self.charges_usd:
            usd = self.charges_usd[key]
            self._store.save_account(
                self.sweep_id, key, ceiling_usd=usd, spent_usd=usd, settled=True, spend_kind=kind
            )
            return
        a = self.trials[key]
        self._store.save_account(
            self.sweep_id,
            key,
            ceiling_usd=a.ceiling_usd,
            spent_usd=a.spent_usd,
            settled=a.settled,
            predicted_usd=predicted_usd,
            spend_kind=kind,
        )

    def _committed_usd(self, excluding: str | None = None) -> float:
        trials = sum(a.committed_usd for k, a in self.trials.items() if k != excluding)
        return trials + sum(self.charges_usd.values())

    def fits(self, usd: float) -> bool:
        return self._committed_usd() + usd <= self.cap_usd

    def charge(self, key: str, usd: float) -> None:
        """Record spend that is not a trial's (e.g. the base-model eval)."""
        self.charges_usd[key] = self.charges_usd.get(key, 0.0) + usd
        self._persist(key, "charge")

    def reserve(self, trial_id: str, usd: float, predicted_usd: float | None = None) -> bool:
        """Admit a new trial with ceiling ``usd`` if it fits under the cap; ``predicted_usd`` is
        its predicted full cost, kept to compare with what it spends."""
        if not self.fits(usd):
            return False
        self.trials[trial_id] = TrialAccount(ceiling_usd=usd, predicted_usd=predicted_usd)
        self._persist(trial_id, predicted_usd=predicted_usd)
        return True

    def predicted(self, trial_id: str) -> float | None:
        acct = self.trials.get(trial_id)
        return acct.predicted_usd if acct else None

    def request(self, trial_id: str, total_usd: float) -> bool:
        """Raise a running trial's ceiling to ``total_usd`` if the cap allows."""
        acct = self.trials[trial_id]
        if acct.settled:
            return False
        if total_usd <= acct.ceiling_usd:
            return True
        if self._committed_usd(excluding=trial_id) + total_usd > self.cap_usd:
            return False
        acct.ceiling_usd = total_usd
        self._persist(trial_id)
        return True

    def ceiling(self, trial_id: str) -> float:
        return self.trials[trial_id].ceiling_usd

    def mark_started(self, trial_id: str, unix_s: float | None = None) -> None:
        acct = self.trials.get(trial_id)
        if acct is not None and acct.started_unix is None:
            acct.started_unix = unix_s if unix_s is not None else time.time()

    def started(self, trial_id: str) -> float | None:
        acct = self.trials.get(trial_id)
        return acct.started_unix if acct else None

    def update(self, trial_id: str, spent_usd: float) -> None:
        acct = self.trials[trial_id]
        acct.spent_usd = max(acct.spent_usd, spent_usd)
        self._persist(trial_id, "report")

    def settle(self, trial_id: str, final_usd: float) -> None:
        """The trial released its resources; its commitment becomes what it spent."""
        acct = self.trials.setdefault(trial_id, TrialAccount(ceiling_usd=0.0))
        acct.spent_usd = max(acct.spent_usd, final_usd)
        acct.settled = True
        self._persist(trial_id, "settle")

    def calibrate(self, **timings_s: float) -> None:
        """Keep the slowest measured timing of each kind (conservative predictions)."""
        for name, value in timings_s.items():
            if value and value > 0:
                self.timings[name] = max(self.timings.get(name, 0.0), float(value))

    def get_timings(self) -> dict[str, float]:
        return dict(self.timings)

    def snapshot(self) -> dict[str, float]:
        spent = sum(a.spent_usd for a in self.trials.values()) + sum(self.charges_usd.values())
        committed = self._committed_usd()
        return {
            "cap_usd": self.cap_usd,
            "spent_usd": spent,
            "reserved_usd": committed - spent,
            "remaining_usd": self.cap_usd - committed,
            "running": sum(not a.settled for a in self.trials.values()),
        }


@dataclass(frozen=True)
class CostModel:
    """Predicts a trial's seconds and dollars from its size and the sweep's measurements."""

    price_usd_per_hour: float
    accelerator: str
    units: int  # cores on cpu, GPUs otherwise
    n_params: int  # base model parameters
    tokens_per_step: int  # batch_size x padded sequence length
    eval_batches: int  # eval_examples / batch_size, rounded up

    def _prior_step_s(self) -> float:
        # LoRA trains ~4N FLOPs per token (forward + input gradients; no weight gradients)
        per_unit = PRIOR_FLOPS_PER_S.get(self.accelerator, PRIOR_GPU_FLOPS_PER_S)
        return 4 * self.n_params * self.tokens_per_step / (per_unit * self.units)

    def timings(self, measured: dict[str, float]) -> dict[str, float]:
        step = measured.get("step_s") or self._prior_step_s()
        # eval = loss pass + greedy generation; measured on CPU at ~1.5 train steps per batch
        closing = measured.get("closing_s") or 1.5 * step * self.eval_batches
        startup = measured.get("startup_s") or PRIOR_STARTUP_S.get(
            self.accelerator, PRIOR_GPU_STARTUP_S
        )
        return {"step_s": step, "closing_s": closing, "startup_s": startup}

    def seconds(self, steps: int, evals: int, measured: dict[str, float]) -> float:
        t = self.timings(measured)
        return t["startup_s"] + steps * t["step_s"] + evals * t["closing_s"]

    def usd(
        self, steps: int, evals: int, measured: dict[str, float], safety: float = 1.25
    ) -> float:
        return self.price_usd_per_hour * safety * self.seconds(steps, evals, measured) / 3600.0
