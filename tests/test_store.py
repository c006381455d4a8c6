"""The SQL ledger: the same tests on sqlite and on PostgreSQL (the machine's server, started by
scripts/ensure-postgres.sh; set LORASWEEP_TEST_PG_URL to use another)."""

from __future__ import annotations

import os
import uuid

import pytest

from orchestrator.budget import Ledger
from orchestrator.errors import LorasweepError
from orchestrator.store import Store

PG_URL = os.environ.get("LORASWEEP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG_URL).connect():
            return True
    except Exception:  # noqa: BLE001 - driver missing or server down: skip with the reason
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} (run scripts/ensure-postgres.sh)")
    return PG_URL


def test_a_crashed_ledger_loses_nothing(store_url):
    sweep = f"s-{uuid.uuid4().hex[:8]}"
    ledger = Ledger(cap_usd=10.0, sweep_id=sweep, store_url=store_url, name="x")
    ledger.charge("baseline", 0.5)
    assert ledger.reserve("a", 2.0, predicted_usd=6.0)
    assert ledger.reserve("b", 3.0)
    ledger.update("a", 1.5)
    assert ledger.request("a", 4.0)
    ledger.settle("b", 2.5)
    snap = ledger.snapshot()
    del ledger  # the process dies here: only SQL remains

    totals = Store(store_url).totals(sweep)
    assert totals.cap_usd == 10.0
    assert totals.spent_usd == pytest.approx(snap["spent_usd"]) == pytest.approx(0.5 + 1.5 + 2.5)
    assert totals.reserved_usd == pytest.approx(snap["reserved_usd"]) == pytest.approx(4.0 - 1.5)
    assert totals.remaining_usd == pytest.approx(snap["remaining_usd"])
    accounts = {a.key: a for a in Store(store_url).accounts(sweep)}
    assert accounts["a"].predicted_usd == 6.0 and not accounts["a"].settled
    assert accounts["b"].settled and accounts["b"].spent_usd == 2.5
    history = Store(store_url).spend_history(sweep)
    assert [round(total, 6) for _, total in history] == [0.5, 2.0, 4.5]


def test_unknown_sweep_and_bad_url(store_url, tmp_path):
    with pytest.raises(LorasweepError, match="no ledger"):
        Store(store_url).totals("nope-" + uuid.uuid4().hex)
    with pytest.raises(LorasweepError, match="storage.service_db"):
        Store("postgresql://nobody@127.0.0.1:1/none")
