"""The cap, checked by an outside clock (issue 16): real local Ray, sqlite MLflow and ledger, the
tiny random-init Llama (it stands in for a real model in CI; nothing else is faked).

Spend is measured by the test from the OS's process table (``tests/outside_clock.py``): the
seconds Ray's paid worker processes existed x the price. The sweep's own ``cost_usd`` is only
compared against it.
"""

from __future__ import annotations

import io
import time

import pytest
from _ledger_db import require_pg
from outside_clock import ProcessMeter
from rich.console import Console
from test_sweep_e2e import _spec

from orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow
PRICE = 36.0  # the specs' "cpu" override: one cent per second
SECRET = "pw-never-stored-4711"


def _statuses(result) -> list[str]:
    return [r.status for r in result.rows]


def test_a_cap_tight_enough_to_stop_trials_holds_by_the_outside_clock(
    tmp_path, tiny_model, small_data, ray_local
):
    spec = _spec(tmp_path, tiny_model, small_data, budget_usd=0.30, max_trials=400)
    with ProcessMeter() as meter:
        result = run_sweep(spec, Console(file=io.StringIO()))
    outside_usd = meter.cost_usd(PRICE)
    assert meter.spans, "no paid Ray worker process was seen"
    assert outside_usd <= spec.budget_usd, (outside_usd, meter.spans)
    assert result.spent_usd <= spec.budget_usd
    assert result.end_reason.startswith("budget"), result.end_reason
    # the ledger accounts for what the OS saw (within the meter's polling and Ray's process
    # start before our code runs)
    assert result.spent_usd >= 0.9 * outside_usd - 0.01, (result.spent_usd, outside_usd)


def test_a_hung_step_is_killed_and_the_sweep_ends_within_the_cap(
    tmp_path, tiny_model, small_data, ray_local, monkeypatch
):
    """Every trial's third step sleeps 600 s (``workers/faults.py``): the cooperative check never
    runs again; the watchdog revokes, then kills, and the sweep ends within its cap by the OS's
    clock, in a small fraction of the hang. The Optuna study lives in PostgreSQL behind a URL
    with a password (trust auth ignores it): no file of the sweep's holds that password."""
    monkeypatch.setenv("LORASWEEP_FAULT", "hang@3")
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=0.60, max_trials=2).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["resources"]["max_concurrent_trials"] = 1
    scheme, rest = require_pg().split("://", 1)
    raw["storage"]["optuna_storage"] = (
        f"{scheme}://{rest.split('@')[0]}:{SECRET}@{rest.split('@')[1]}"
    )
    from orchestrator.spec import parse_spec

    spec = parse_spec(raw)
    console = Console(file=io.StringIO(), width=200)
    t0 = time.monotonic()
    with ProcessMeter() as meter:
        result = run_sweep(spec, console)
    wall_s = time.monotonic() - t0
    out = console.file.getvalue()
    assert wall_s < 240, out
    assert meter.cost_usd(PRICE) <= spec.budget_usd, (meter.spans, out)
    assert result.spent_usd <= spec.budget_usd
    assert "budget_killed" in _statuses(result), (_statuses(result), out)
    assert "watchdog" in out and "killed" in out
    assert SECRET not in out
    for path in spec.storage.data_dir.rglob("*"):  # Tune's experiment folder, MLflow, the ledger
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
