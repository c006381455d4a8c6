"""Property-based tests of the ledger (hypothesis): random traffic of reserve, resize, request,
heartbeats with spends above ceilings, settle, settle-open at spend or at ceiling, revoke,
allowance changes and reloads from SQL, on memory, sqlite and PostgreSQL.

Invariants checked after every call:
(a) admission never lets commitments exceed the cap: a call that was granted and raised the
    commitment leaves committed <= cap;
(b) the only way past the cap is a trial spending past its ceiling + allowance (what the outside
    watchdog bounds): spent <= cap + sum over trials of max(0, spent - ceiling - allowance),
    taking for a settled trial its spend when it settled and adding any later, larger reading
    of it (spend that arrives after settlement is recorded, and outside what admission holds),
    and the smallest allowance the sweep has had;
(c) a ledger rebuilt from SQL equals the one that wrote it (then traffic goes on with it);
(d) spent never decreases, for the sweep and for each trial.
"""

from __future__ import annotations

import math
import uuid

import pytest
from _ledger_db import require_pg, state
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.budget import Ledger

IDS = st.sampled_from("abcdef")
USD = st.floats(0.0, 3.0, allow_nan=False, allow_infinity=False)
ALLOWANCES = st.sampled_from([0.0, 0.05, 0.25, 1.0])
OP = st.one_of(
    st.tuples(st.just("reserve"), IDS, USD),
    st.tuples(st.just("resize"), IDS, USD),
    st.tuples(st.just("request"), IDS, USD),
    st.tuples(st.just("update"), IDS, USD),
    st.tuples(st.just("update"), IDS, USD),
    st.tuples(st.just("settle"), IDS, USD),
    st.tuples(st.just("settle_open"), st.sampled_from(["spent", "ceiling"])),
    st.tuples(st.just("revoke"), IDS),
    st.tuples(st.just("allowance"), ALLOWANCES),
    st.tuples(st.just("reload")),
)
TRAFFIC = {
    "ops": st.lists(OP, max_size=40),
    "cap": st.sampled_from([0.5, 1.0, 2.5, 10.0]),
    "allowance": ALLOWANCES,
}
EPS = 1e-9


class Run:
    """One ledger under traffic, with what the test itself knows of its history."""

    def __init__(self, cap: float, allowance: float, url: str | None) -> None:
        self.cap, self.url, self.sweep = cap, url, f"p-{uuid.uuid4().hex[:10]}"
        self.ledger = Ledger(cap, sweep_id=self.sweep, store_url=url, allowance_usd=allowance)
        self.min_allowance = allowance
        self.settled_at: dict[str, float] = {}  # a trial's spend when it first settled
        self.spent = 0.0
        self.trial_spent: dict[str, float] = {}

    def committed(self) -> float:
        """Commitments by the formula, from the accounts' fields (not the ledger's own sums):
        each unsettled trial max(ceiling + allowance, spent), each settled one its spend."""
        a = self.ledger.allowance_usd
        terms = [
            t.spent_usd if t.settled else max(t.ceiling_usd + a, t.spent_usd)
            for t in self.ledger.trials.values()
        ]
        committed = math.fsum(terms)
        snap = self.ledger.snapshot()
        assert snap["cap_usd"] - snap["remaining_usd"] == pytest.approx(committed, abs=EPS)
        return committed

    def apply(self, op: tuple) -> None:
        kind, *args = op
        before = self.committed()
        granted = getattr(self, f"_{kind}")(*args)
        after = self.committed()
        if granted and after > before + EPS:
            assert after <= self.cap + EPS, (op, before, after)  # (a)
        self._note_settlements()
        self._check_spend()

    # --- the calls ----------------------------------------------------------------------------
    def _reserve(self, tid: str, usd: float) -> bool:
        return self.ledger.reserve(tid, usd, predicted_usd=2 * usd)

    def _resize(self, tid: str, usd: float) -> bool:
        return tid in self.ledger.trials and self.ledger.resize(tid, usd)

    def _request(self, tid: str, more: float) -> bool:
        if tid not in self.ledger.trials:
            return False
        return self.ledger.request(tid, self.ledger.ceiling(tid) + more)

    def _update(self, tid: str, more: float) -> bool:
        if tid in self.ledger.trials:  # heartbeats, often far past the ceiling
            self.ledger.update(tid, self.ledger.trials[tid].spent_usd + more)
        return False

    def _settle(self, tid: str, more: float) -> bool:
        if tid in self.ledger.trials:
            self.ledger.settle(tid, self.ledger.trials[tid].spent_usd + more / 4)
        return False

    def _settle_open(self, at: str) -> bool:
        open_before = set(self.ledger.open_accounts())
        assert set(self.ledger.settle_open(at=at)) == open_before
        assert self.ledger.open_accounts() == {}
        return False

    def _revoke(self, tid: str) -> bool:
        if tid in self.ledger.trials:
            self.ledger.revoke(tid)
            assert self.ledger.revoked(tid)
            assert not self.ledger.request(tid, self.ledger.ceiling(tid) + 1.0)
        return False

    def _allowance(self, usd: float) -> bool:
        self.ledger.set_allowance(usd)
        self.min_allowance = min(self.min_allowance, usd)
        return False

    def _reload(self) -> bool:
        if self.url is None:
            return False
        was = state(self.ledger)
        self.ledger.close()
        self.ledger = Ledger(2 * self.cap + 1, sweep_id=self.sweep, store_url=self.url)
        assert state(self.ledger) == was  # (c)
        return False

    # --- invariants (b) and (d) -----------------------------------------------------------------
    def _note_settlements(self) -> None:
        for tid, acct in self.ledger.trials.items():
            if acct.settled and tid not in self.settled_at:
                self.settled_at[tid] = acct.spent_usd

    def _check_spend(self) -> None:
        a = self.min_allowance
        over, late = [], []
        for tid, acct in self.ledger.trials.items():
            spent = self.settled_at.get(tid, acct.spent_usd)
            over.append(max(0.0, spent - acct.ceiling_usd - a))
            late.append(acct.spent_usd - spent)
            assert acct.spent_usd >= self.trial_spent.get(tid, 0.0)  # (d)
            self.trial_spent[tid] = acct.spent_usd
        spent = self.ledger.snapshot()["spent_usd"]
        assert spent <= self.cap + math.fsum(over) + math.fsum(late) + EPS  # (b)
        assert spent >= self.spent - EPS  # (d)
        self.spent = spent


def run(ops, cap, allowance, url=None) -> None:
    traffic = Run(cap, allowance, url)
    try:
        for op in ops:
            traffic.apply(op)
        traffic.apply(("reload",))
    finally:
        traffic.ledger.close()


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('props') / 'ledger.db'}"


@pytest.fixture(scope="module")
def pg_url():
    return require_pg()


@settings(max_examples=300, deadline=None, database=None)
@given(**TRAFFIC)
def test_ledger_invariants_in_memory(ops, cap, allowance):
    run(ops, cap, allowance)


@settings(max_examples=60, deadline=None, database=None)
@given(**TRAFFIC)
def test_ledger_invariants_and_reload_on_sqlite(sqlite_url, ops, cap, allowance):
    run(ops, cap, allowance, sqlite_url)


@settings(max_examples=15, deadline=None, database=None)
@given(**TRAFFIC)
def test_ledger_invariants_and_reload_on_postgresql(pg_url, ops, cap, allowance):
    run(ops, cap, allowance, pg_url)
