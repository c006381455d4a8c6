"""Pricing what a dead driver left open: the crash time is bounded by the driver's heartbeat and,
while the trials were beating, by the ledger's last write (a real sqlite store)."""

from __future__ import annotations

import time

import pytest

from orchestrator.lifecycle import (
    DRIVER_DEATH_S,
    HEARTBEAT_DELIVERY_S,
    crash_bound_unix,
    crash_settlements,
)
from orchestrator.store import Store
from orchestrator.watchdog import HEARTBEAT_S

BEAT_S = HEARTBEAT_S + HEARTBEAT_DELIVERY_S


def test_trials_beating_at_the_crash_bound_it_by_the_sooner_heartbeat():
    # the ledger wrote just before the driver's last beat: dead within one driver period
    assert crash_bound_unix(100.0, [99.0]) == pytest.approx(
        min(100.0 + DRIVER_DEATH_S, 99.0 + BEAT_S)
    )
    # just after it: still the sooner of the two, and never before that write
    assert crash_bound_unix(100.0, [100.1]) == pytest.approx(
        max(100.1, min(100.0 + DRIVER_DEATH_S, 100.1 + BEAT_S))
    )
    assert crash_bound_unix(100.0, [100.5]) == pytest.approx(100.5)
    # never before the last sign of life
    assert crash_bound_unix(100.0, [99.5]) >= 100.0


def test_a_ledger_that_outlived_the_drivers_beats_bounds_it_by_its_own_writes():
    # the driver's heartbeat thread stalled at 100 while its ledger still wrote at 110
    assert crash_bound_unix(100.0, [110.0]) == pytest.approx(110.0 + BEAT_S)


def test_accounts_quiet_before_the_driver_died_are_billed_to_its_period():
    # nothing beat for 20 s before the driver's last beat (no trial was running then)
    assert crash_bound_unix(100.0, [80.0]) == pytest.approx(100.0 + DRIVER_DEATH_S)
    assert crash_bound_unix(100.0, []) == pytest.approx(100.0 + DRIVER_DEATH_S)


def test_a_row_without_a_driver_heartbeat_uses_the_ledger_writes():
    assert crash_bound_unix(None, [50.0, 51.0]) == pytest.approx(51.0 + BEAT_S)


def test_open_accounts_are_settled_to_the_bound_never_below_what_they_reported(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.open_sweep("s1", "s1", 1.0)
    fields = {"ceiling_usd": 0.5, "settled": False, "charge": False}
    store.save_account("s1", "quiet", spent_usd=0.0, **fields)  # reserved, never started
    started = time.time() - 3.0  # started 3 s ago, still loading: no heartbeat yet
    store.save_account("s1", "loading", spent_usd=0.0, started_unix=started, **fields)
    store.save_account("s1", "done", spent_usd=0.2, **{**fields, "settled": True})
    store.save_account("s1", "a", spent_usd=0.1, **fields)
    store.save_account("s1", "b", spent_usd=0.3, **fields)
    beat = time.time()  # the driver's last beat, after the trials' last writes
    store.set_sweep("s1", driver_heartbeat_unix=beat)
    rows = {a.key: a for a in store.accounts("s1")}
    bound = crash_bound_unix(beat, [rows[k].updated_unix for k in ("quiet", "loading", "a", "b")])
    assert bound <= beat + DRIVER_DEATH_S + 1e-6

    price = 36.0  # 1 cent a second
    out = crash_settlements(store, "s1", price)
    assert set(out) == {"quiet", "loading", "a", "b"}  # settled accounts are left as they are
    assert out["quiet"] == 0.0  # a trial that never started is not billed for the gap
    # one that started is billed from its start, its first heartbeat not yet written
    assert out["loading"] == pytest.approx(price * (bound - started) / 3600.0)
    for key in ("a", "b"):
        gap_s = bound - rows[key].updated_unix
        assert out[key] == pytest.approx(rows[key].spent_usd + price * gap_s / 3600.0)
        assert out[key] >= rows[key].spent_usd
        assert gap_s <= DRIVER_DEATH_S + 1.0  # at most a period (and this test's writes) past
    store.close()
