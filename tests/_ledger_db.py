"""Helpers shared by the ledger and store tests: the databases they run on, a ledger's full state,
and a deterministic traffic generator that a killed child process and the test replay alike."""

from __future__ import annotations

import functools
import json
import os
import random
import sys
from dataclasses import asdict

import pytest

PG_URL = os.environ.get("LORASWEEP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


@functools.cache
def pg_problem(url: str = PG_URL) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or None when it answers."""
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect():
                return None
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - driver missing or server down: say which
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def require_pg(url: str = PG_URL) -> str:
    """``url`` if PostgreSQL answers there; otherwise skip, or fail when ``CI=true`` (CI must run
    the PostgreSQL tests, not skip them silently)."""
    problem = pg_problem(url)
    if problem is None:
        return url
    from sqlalchemy.engine import make_url

    reason = (
        f"PostgreSQL not reachable at {make_url(url).render_as_string(hide_password=True)} "
        f"({problem}); run scripts/ensure-postgres.sh"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def backend_url(backend: str, tmp_path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return require_pg()


def state(ledger) -> dict:
    """Everything a ledger knows that SQL must give back (timings aside)."""
    return {
        "cap_usd": ledger.cap_usd,
        "allowance_usd": ledger.allowance_usd,
        "snapshot": ledger.snapshot(),
        "trials": {k: asdict(a) for k, a in sorted(ledger.trials.items())},
        "charges": dict(sorted(ledger.charges_usd.items())),
    }


# --- deterministic traffic (the kill test runs it in a child and replays it here) ------------
TRAFFIC_CAP = 10.0
TRAFFIC_ALLOWANCE = 0.05


def traffic_step(ledger, rng: random.Random, i: int) -> None:
    """One call of sweep-like traffic; which call and its arguments depend only on ``rng`` and
    the ledger's state, so the same seed replays the same calls."""
    open_ids = sorted(ledger.open_accounts())
    r = rng.random()
    if r < 0.25 or not open_ids:
        ledger.reserve(f"t{i:05d}", rng.uniform(0.05, 1.5), predicted_usd=rng.uniform(0.1, 3))
        return
    tid = rng.choice(open_ids)
    acct = ledger.trials[tid]
    if r < 0.35:
        ledger.request(tid, acct.ceiling_usd + rng.uniform(0, 0.5))
    elif r < 0.40:
        ledger.resize(tid, rng.uniform(0.05, 1.5), predicted_usd=rng.uniform(0.1, 3))
    elif r < 0.70:
        # a heartbeat, sometimes past the ceiling (a trial the watchdog has not stopped yet)
        ledger.update(tid, acct.spent_usd + rng.uniform(0, 0.3))
    elif r < 0.75:
        ledger.mark_started(tid, 1_000.0 + i)
    elif r < 0.80:
        ledger.revoke(tid)
    elif r < 0.83:
        ledger.set_allowance(rng.choice([0.0, 0.05, 0.1]))
    elif r < 0.85:
        ledger.charge(f"c{i % 3}", rng.uniform(0, 0.01))
    else:
        ledger.settle(tid, acct.spent_usd + rng.uniform(0, 0.1))


def run_traffic_child(url: str, sweep_id: str, seed: int, steps: int) -> None:
    """The child process of the kill test: traffic on a stored ledger, its state printed after
    every completed call (one JSON line each)."""
    from orchestrator.budget import Ledger

    ledger = Ledger(TRAFFIC_CAP, sweep_id=sweep_id, store_url=url, allowance_usd=TRAFFIC_ALLOWANCE)
    rng = random.Random(seed)
    print(json.dumps({"i": -1, "state": state(ledger)}), flush=True)
    for i in range(steps):
        traffic_step(ledger, rng, i)
        sys.stdout.write(json.dumps({"i": i, "state": state(ledger)}) + "\n")
        sys.stdout.flush()


def replay_traffic(seed: int, steps: int) -> list[dict]:
    """The states the child goes through, replayed on an in-memory ledger: index 0 is the state
    before the first call, index k the state after call k-1."""
    from orchestrator.budget import Ledger

    ledger = Ledger(TRAFFIC_CAP, allowance_usd=TRAFFIC_ALLOWANCE)
    rng = random.Random(seed)
    states = [state(ledger)]
    for i in range(steps):
        traffic_step(ledger, rng, i)
        states.append(state(ledger))
    return states
