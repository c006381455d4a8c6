"""The budget engine: a ledger that never lets commitments exceed the cap.

Every trial holds a *ceiling*: the most it may spend. Each running (unsettled) trial commits

    max(ceiling + allowance, spent)

and settled trials and fixed charges commit what they spent. The ledger admits a trial, or
raises a ceiling, only while the sum of all commitments stays <= ``cap_usd``.

The *allowance* (``allowance_usd``) is the watchdog's enforcement margin, set by the sweep driver
as price x (margin + grace) seconds: a trial checks its grant before every step (the worker keeps
room for its closing eval and save; see ``workers/train.py``), and a watchdog outside the trial
revokes the grant of one whose held time x price passes its ceiling, then kills it if it has not
stopped within a grace period. So a running trial's worst case is its ceiling plus the allowance,
and that is what admission keeps room for: the total spent stays within the cap as long as the
watchdog stops every trial within its allowance. The only way past the cap is a trial spending
more than ceiling + allowance (the watchdog late or not running); such a trial then commits its
spend, and nothing new is admitted until the ledger is back under the cap. Admission reserves a
new trial's ceiling up to its first early-stopping rung; trials ask for more before each further
interval and stop gracefully when refused or revoked.

The class is plain Python (unit-testable); the sweep runs it as a Ray actor (with restarts) so
workers reach it. With ``store_url`` every change is written to SQL (``orchestrator/store.py``)
*before* it is applied in memory: if the write fails, the call raises ``StoreError`` and the
ledger is unchanged. A ``Ledger`` built for a sweep that already has rows reloads them (cap,
allowance, every account and charge), so a restarted actor comes back exactly as it was after
its last completed call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from orchestrator.costmodel import is_portable

RECENT = 3  # calibration looks at the last few measurements of each kind


@dataclass
class TrialAccount:
    ceiling_usd: float
    spent_usd: float = 0.0
    started_unix: float | None = None
    settled: bool = False
    predicted_usd: float | None = None
    revoked: bool = False  # the watchdog stopped its grant: its ceiling never rises again

    def committed_usd(self, allowance_usd: float = 0.0) -> float:
        """What the account holds of the cap: a settled trial its spend, a running one its
        ceiling plus the watchdog's allowance, or its spend once past that."""
        if self.settled:
            return self.spent_usd
        return max(self.ceiling_usd + allowance_usd, self.spent_usd)

    def row(self) -> dict:
        """The account as the store writes it."""
        return {
            "ceiling_usd": self.ceiling_usd,
            "spent_usd": self.spent_usd,
            "predicted_usd": self.predicted_usd,
            "settled": self.settled,
            "revoked": self.revoked,
            "started_unix": self.started_unix,
            "charge": False,
        }


def _usd(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite amount >= 0, got {value!r}")
    return value


# Tune stops a cached worker soon after its last trial when no trial waits for it; the phase's
# end is only an upper bound of when, so a tail is billed up to this long
IDLE_TAIL_MAX_S = 1.0


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
    allowance_usd: float = 0.0  # the watchdog's enforcement allowance per running trial

    def __post_init__(self) -> None:
        self.allowance_usd = _usd("allowance_usd", self.allowance_usd)
        self._recent: dict[str, list[float]] = {k: [v] for k, v in self.timings.items()}
        # each trial's last word (memory only: lost with this actor, then the driver's clock
        # bills): (final spend, this actor's monotonic time it came, the worker process)
        self._last_words: dict[str, tuple[float, float, str]] = {}
        self._began: dict[str, tuple[float, str]] = {}  # trial -> (this actor's time, worker)
        # per worker process, on this actor's wall clock (unix s): its latest trial's start and
        # latest last word; joined with Ray's actor records after a phase (actor_spans.py)
        self._worker_began_unix: dict[str, float] = {}
        self._worker_word_unix: dict[str, float] = {}
        self._reported_unix: dict[str, float] = {}  # trial -> when its spend last grew
        self._store = None
        if self.store_url:
            from orchestrator.store import Store

            self._store = Store(self.store_url)
            self._load()
            if self.calibration_key:
                stored = self._store.calibration(*self.calibration_key)
                self.timings.update(stored)
                self._recent.update({k: [v] for k, v in stored.items()})

    def _load(self) -> None:
        """Create the sweep's rows, or rebuild from them: a sweep that has rows keeps its stored
        cap and allowance, its accounts and its charges."""
        from orchestrator.store import account_fields

        sweep = self._store.open_sweep(
            self.sweep_id, self.name or self.sweep_id, self.cap_usd, self.allowance_usd
        )
        self.cap_usd = sweep.cap_usd
        if sweep.allowance_usd is not None:
            self.allowance_usd = sweep.allowance_usd
        for key, f in account_fields(self._store.accounts(self.sweep_id)).items():
            if f.pop("charge"):
                self.charges_usd[key] = f["spent_usd"]
            else:
                self.trials[key] = TrialAccount(**f)

    def close(self) -> None:
        """Release the store's connections (a stored ledger; nothing to do in memory)."""
        if self._store is not None:
            self._store.close()

    # --- SQL first, then memory -------------------------------------------------------------
    def _apply(self, changes: dict[str, TrialAccount], kind: str | None = None) -> None:
        """Write the new accounts (all in one transaction), then take them into memory."""
        if self._store is not None and changes:
            rows = {k: a.row() for k, a in changes.items()}
            self._store.save_accounts(self.sweep_id, rows, spend_kind=kind)
        self.trials.update(changes)

    def _apply_charge(self, key: str, usd: float) -> None:
        if self._store is not None:
            row = {"ceiling_usd": usd, "spent_usd": usd, "settled": True, "charge": True}
            self._store.save_account(self.sweep_id, key, spend_kind="charge", **row)
        self.charges_usd[key] = usd

    # --- commitments ------------------------------------------------------------------------
    def _commitments(self, excluding: str | None = None) -> list[float]:
        a = self.allowance_usd
        trials = [t.committed_usd(a) for k, t in self.trials.items() if k != excluding]
        return trials + list(self.charges_usd.values())

    def _committed_usd(self, excluding: str | None = None) -> float:
        return math.fsum(self._commitments(excluding))  # exact: independent of the order

    def _admits(self, trial_id: str | None, account: TrialAccount) -> bool:
        """Whether ``account``, in place of ``trial_id``'s (or added, for None), keeps all
        commitments within the cap."""
        terms = [*self._commitments(excluding=trial_id), account.committed_usd(self.allowance_usd)]
        return math.fsum(terms) <= self.cap_usd

    def fits(self, usd: float) -> bool:
        """Whether a new trial with ceiling ``usd`` would be admitted now."""
        return self._admits(None, TrialAccount(ceiling_usd=usd))

    # --- calls ------------------------------------------------------------------------------
    def charge_once(self, key: str, usd: float) -> None:
        """Record a fixed spend under a key of its own: the same call again (a retry after this
        actor restarted) records nothing more."""
        if key not in self.charges_usd:
            self._apply_charge(key, usd)

    def charge(self, key: str, usd: float) -> None:
        """Record spend that is not a trial's (e.g. the base-model eval)."""
        self._apply_charge(key, self.charges_usd.get(key, 0.0) + usd)

    def reserve(self, trial_id: str, usd: float, predicted_usd: float | None = None) -> bool:
        """Admit a new trial with ceiling ``usd`` if it (plus the allowance) fits under the cap;
        ``predicted_usd`` is its predicted full cost, kept to compare with what it spends.

        An id already admitted is refused (``resize`` or ``request`` change its ceiling), unless
        its account is exactly what this call would make: the same call again, retried by Ray
        after the actor restarted between writing it and answering."""
        account = TrialAccount(ceiling_usd=usd, predicted_usd=predicted_usd)
        if trial_id in self.trials:
            return self.trials[trial_id] == account
        if not self._admits(trial_id, account):
            return False
        self._apply({trial_id: account})
        return True

    def predicted(self, trial_id: str) -> float | None:
        acct = self.trials.get(trial_id)
        return acct.predicted_usd if acct else None

    def resize(self, trial_id: str, usd: float, predicted_usd: float | None = None) -> bool:
        """Set an admitted trial's ceiling to ``usd`` (down always; up only if the cap allows and
        the trial is not revoked) once its config, and so its own prediction, is known. A settled
        trial's ceiling no longer moves."""
        acct = self.trials[trial_id]
        if acct.settled:
            return False
        new = replace(acct, ceiling_usd=usd)
        if predicted_usd is not None:
            new.predicted_usd = predicted_usd
        if usd > acct.ceiling_usd and (acct.revoked or not self._admits(trial_id, new)):
            return False
        self._apply({trial_id: new})
        return True

    def request(self, trial_id: str, total_usd: float) -> bool:
        """Raise a running trial's ceiling to ``total_usd`` if the cap allows; never for a settled
        or revoked trial."""
        acct = self.trials[trial_id]
        if acct.settled or acct.revoked:
            return False
        if total_usd <= acct.ceiling_usd:
            return True
        new = replace(acct, ceiling_usd=total_usd)
        if not self._admits(trial_id, new):
            return False
        self._apply({trial_id: new})
        return True

    def ceiling(self, trial_id: str) -> float:
        return self.trials[trial_id].ceiling_usd

    def mark_started(self, trial_id: str, unix_s: float | None = None) -> None:
        acct = self.trials.get(trial_id)
        if acct is not None and acct.started_unix is None:
            started = unix_s if unix_s is not None else time.time()
            self._apply({trial_id: replace(acct, started_unix=started)})

    def started(self, trial_id: str) -> float | None:
        acct = self.trials.get(trial_id)
        return acct.started_unix if acct else None

    def update(self, trial_id: str, spent_usd: float) -> None:
        """A heartbeat or report: the trial has spent ``spent_usd`` so far (spend never goes
        down). Past ceiling + allowance the trial commits what it spent."""
        acct = self.trials[trial_id]
        # settled: billed and recorded (MLflow too); a late heartbeat or last word is the
        # worker's time after Tune stopped its trial (the phase's idle tail or the next trial's)
        if acct.settled:
            return
        if spent_usd > acct.spent_usd:  # when the latest spend came (the watchdog bills on)
            self._reported_unix[trial_id] = time.time()
        self._apply({trial_id: replace(acct, spent_usd=max(acct.spent_usd, spent_usd))}, "report")

    def last_word(self, trial_id: str, spent_usd: float, worker: str) -> None:
        """The trial's function returned having spent ``spent_usd`` (on its own process's
        clock); ``worker`` names its process. Its bill ends there: a reused worker's next trial
        bills from that moment, so nothing after it belongs to this trial."""
        self.update(trial_id, spent_usd)
        self._last_words[trial_id] = (float(spent_usd), time.monotonic(), worker)
        self._worker_word_unix[worker] = time.time()

    def began(self, trial_id: str, worker: str) -> None:
        """The trial started in worker process ``worker`` (for the phase's idle tails)."""
        self._began[trial_id] = (time.monotonic(), worker)
        self._worker_began_unix[worker] = time.time()

    def trial_workers(self) -> dict[str, tuple[float, float | None]]:
        """Each worker process that ran a trial: (when its latest trial began, when its latest
        last word came, None if none), unix seconds on this actor's clock."""
        words = self._worker_word_unix
        return {w: (began, words.get(w)) for w, began in self._worker_began_unix.items()}

    def final_word(self, trial_id: str) -> float | None:
        """The spend of the trial's last word, if it came."""
        word = self._last_words.get(trial_id)
        return None if word is None else word[0]

    def idle_tails(self, trial_ids: list[str]) -> dict[str, float]:
        """Per worker process that ran some of ``trial_ids``: seconds since the last of them
        ended in it (what a worker held after its last trial, until its phase released it). A
        worker whose latest trial began after its latest last word has none: that trial (billed
        on its own account) was still running, or died with its worker."""
        now, ended, began = time.monotonic(), {}, {}
        for trial_id in trial_ids:
            if (word := self._last_words.get(trial_id)) is not None:
                ended[word[2]] = max(ended.get(word[2], 0.0), word[1])
            if (start := self._began.get(trial_id)) is not None:
                began[start[1]] = max(began.get(start[1], 0.0), start[0])
        return {
            w: min(now - at, IDLE_TAIL_MAX_S) for w, at in ended.items() if began.get(w, 0.0) <= at
        }

    def settle(self, trial_id: str, final_usd: float) -> None:
        """The trial released its resources; its commitment becomes what it spent (the larger
        of its last report and ``final_usd``)."""
        acct = self.trials.get(trial_id, TrialAccount(ceiling_usd=0.0))
        new = replace(acct, spent_usd=max(acct.spent_usd, final_usd), settled=True)
        self._apply({trial_id: new}, "settle")

    def spent(self, trial_id: str) -> float:
        """What the trial spent so far, settled or not (0 for an unknown one)."""
        acct = self.trials.get(trial_id)
        return acct.spent_usd if acct else 0.0

    def reopen(self, trial_id: str, extra_usd: float) -> bool:
        """A settled trial runs again (a resumed sweep restarts it from its checkpoint): open
        its account with a ceiling of what it spent plus ``extra_usd``, if the cap allows."""
        acct = self.trials.get(trial_id)
        if acct is None or not acct.settled:
            return acct is not None
        new = replace(acct, settled=False, ceiling_usd=acct.spent_usd + extra_usd)
        if not self._admits(trial_id, new):
            return False
        self._apply({trial_id: new})
        return True

    def settle_open(self, at: str = "spent") -> list[str]:
        """Settle every open trial, all in one write: at its spend (``at="spent"``), or at the
        larger of its spend and its ceiling (``at="ceiling"``: its spend is not known, e.g. when
        a sweep stops on an error). Returns the settled trials' ids."""
        if at not in ("spent", "ceiling"):
            raise ValueError(f"settle_open: at={at!r}; use 'spent' or 'ceiling'")
        changes = {}
        for trial_id, acct in self.trials.items():
            if not acct.settled:
                final = acct.spent_usd if at == "spent" else max(acct.spent_usd, acct.ceiling_usd)
                changes[trial_id] = replace(acct, spent_usd=final, settled=True)
        self._apply(changes, "settle")
        return list(changes)

    def revoke(self, trial_id: str) -> None:
        """The watchdog stopped this trial's grant: ``request`` refuses it from now on and its
        ceiling never rises; it still reports its spend and settles as usual."""
        acct = self.trials.get(trial_id)
        if acct is not None and not acct.revoked:
            self._apply({trial_id: replace(acct, revoked=True)})

    def revoked(self, trial_id: str) -> bool:
        acct = self.trials.get(trial_id)
        return bool(acct and acct.revoked)

    def wind_down(self) -> None:
        """The sweep is closing (Ctrl-C, SIGTERM, a cancel): every running trial closes at its
        next step, with its final eval and adapter save where its grant allows."""
        self.closing = True

    def standing(self, trial_id: str) -> str:
        """What a running trial's heartbeat learns: ``revoked`` (stop before the next step, no
        closing), ``closing`` (close now, inside the grant) or ``ok``."""
        if self.revoked(trial_id):
            return "revoked"
        return "closing" if getattr(self, "closing", False) else "ok"

    def open_accounts(self) -> dict[str, dict]:
        """Every unsettled trial's ceiling, spend, how long ago that spend came and whether it is
        revoked (for the watchdog)."""
        now = time.time()
        return {
            k: {
                "ceiling_usd": a.ceiling_usd,
                "spent_usd": a.spent_usd,
                "revoked": a.revoked,
                # seconds since that spend came: the watchdog bills on from then, not from its poll
                "reported_s_ago": max(0.0, now - self._reported_unix.get(k, now)),
            }
            for k, a in self.trials.items()
            if not a.settled
        }

    def set_allowance(self, usd: float) -> None:
        """Change the watchdog's allowance per running trial (it applies to trials already
        running too; a larger one can leave the ledger over the cap until trials settle, and
        nothing new is admitted meanwhile)."""
        usd = _usd("allowance_usd", usd)
        if self._store is not None:
            self._store.set_allowance(self.sweep_id, usd)
        self.allowance_usd = usd

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
        # what carries over to later sweeps of the same model and accelerator (closing time
        # depends on the sweep's eval settings, so it does not): costmodel.PORTABLE_PREFIXES
        portable = {k: v for k, v in changed.items() if is_portable(k)}
        if self._store is not None and self.calibration_key and portable:
            self._store.save_calibration(*self.calibration_key, portable)

    def get_timings(self) -> dict[str, float]:
        return dict(self.timings)

    def snapshot(self) -> dict[str, float]:
        spent = math.fsum(
            [*(a.spent_usd for a in self.trials.values()), *self.charges_usd.values()]
        )
        committed = self._committed_usd()
        return {
            "cap_usd": self.cap_usd,
            "spent_usd": spent,
            "reserved_usd": committed - spent,
            "remaining_usd": self.cap_usd - committed,
            "allowance_usd": self.allowance_usd,  # kept beside each running trial
            "running": sum(not a.settled for a in self.trials.values()),
        }
