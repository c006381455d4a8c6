"""The budget engine (first cut): a ledger that never lets commitments exceed the cap.

Every trial holds a *ceiling*: the most it may spend. The ledger grants ceilings only while

    sum over trials of max(ceiling, spent) + fixed charges <= cap_usd,

so the total spent can never pass the cap as long as each trial stays under its ceiling (the
worker checks that before every step, keeping room for a closing eval and save; see
``workers/train.py``). Admission reserves a new trial's ceiling up to its first early-stopping
rung; trials ask for more before each further interval and stop gracefully when refused.

Worst case overshoot: on the last interval before the cap, a trial's closing eval + save plus
the release of its resources (the billed time after its last report, measured per trial, the
longest of the last few kept) taking more than ``SAFETY`` (1.25x) what was measured. Tests and
the demo measure zero. (Before release time was kept inside the ceilings, a test sweep of many
sub-second trials did overshoot its cap by 0.2%: each trial's tail after its last report was
billed outside its ceiling.)

The class is plain Python (unit-testable); the sweep runs it as a Ray actor so workers reach it.
With ``store_url`` every change is also written to SQL (``orchestrator/store.py``) as it happens,
so a crash loses nothing that was spent or reserved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# measured timings that carry over to later sweeps of the same model and accelerator (closing
# time depends on the sweep's eval settings, so it does not)
PORTABLE_TIMINGS = ("flops_per_s:", "startup_s")
RECENT = 3  # calibration looks at the last few measurements of each kind


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
    calibration_key: tuple[str, str] | None = None  # (model, accelerator) to load and keep

    def __post_init__(self) -> None:
        self._recent: dict[str, list[float]] = {k: [v] for k, v in self.timings.items()}
        self._store = None
        if self.store_url:
            from orchestrator.store import Store

            self._store = Store(self.store_url)
            self._store.create_sweep(self.sweep_id, self.name or self.sweep_id, self.cap_usd)
            if self.calibration_key:
                stored = self._store.calibration(*self.calibration_key)
                self.timings.update(stored)
                self._recent.update({k: [v] for k, v in stored.items()})

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

    def resize(self, trial_id: str, usd: float, predicted_usd: float | None = None) -> bool:
        """Set an admitted trial's ceiling to ``usd`` (down always; up only if the cap allows)
        once its config, and so its own prediction, is known."""
        acct = self.trials[trial_id]
        if usd > acct.ceiling_usd and self._committed_usd(excluding=trial_id) + usd > self.cap_usd:
            return False
        acct.ceiling_usd = usd
        if predicted_usd is not None:
            acct.predicted_usd = predicted_usd
        self._persist(trial_id, predicted_usd=predicted_usd)
        return True

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

    def calibrate(self, **timings: float) -> None:
        """Keep a conservative view of recent measurements of each kind: the slowest FLOP/s
        (``flops_per_s:<method>``) and the longest durations (``*_s``) among the last
        ``RECENT`` measurements, so a one-off cold start ages out instead of pricing every later
        trial. (Admission predictions only decide what starts; the cap itself is held by the
        ceilings, whatever the predictions.)"""
        changed = {}
        for name, value in timings.items():
            if not value or value <= 0:
                continue
            recent = self._recent.setdefault(name, [])
            recent[:] = [*recent, float(value)][-RECENT:]
            pick = min if name.startswith("flops_per_s:") else max
            new = pick(recent)
            if new != self.timings.get(name):
                self.timings[name] = changed[name] = new
        portable = {k: v for k, v in changed.items() if k.startswith(PORTABLE_TIMINGS)}
        if self._store is not None and self.calibration_key and portable:
            self._store.save_calibration(*self.calibration_key, portable)

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
