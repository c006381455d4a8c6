"""Cost arithmetic, the price catalog and the ledger's cap invariant (pure unit tests)."""

from __future__ import annotations

import random

import pytest

from orchestrator.budget import CostModel, Ledger
from orchestrator.errors import SpecError
from orchestrator.prices import cost_usd, load_catalog, trial_price_usd_per_hour


def test_catalog_rows_have_price_source_and_date():
    catalog = load_catalog()
    assert {"cpu", "H100", "A100-80GB", "L4"} <= set(catalog)
    for row in catalog.values():
        assert row.price_usd_per_hour > 0 and row.source and row.date


def test_trial_price_counts_gpus_or_cores():
    catalog = load_catalog(overrides={"H100": 2.5})
    assert trial_price_usd_per_hour(catalog, "H100", gpus=2, cpus=16) == pytest.approx(5.0)
    assert trial_price_usd_per_hour(catalog, "cpu", gpus=0, cpus=4) == pytest.approx(
        4 * catalog["cpu"].price_usd_per_hour
    )


def test_cost_is_price_times_billed_hours():
    # 2 GPUs at $3/GPU-hour for 90 minutes = $9
    assert cost_usd(2 * 3.0, 90 * 60) == pytest.approx(9.0)


def test_unknown_accelerator_and_bad_prices_are_refused(tmp_path):
    with pytest.raises(SpecError, match="no price for 'TPUv9'") as err:
        trial_price_usd_per_hour(load_catalog(), "TPUv9", gpus=1, cpus=1)
    assert err.value.field == "resources.accelerator"
    with pytest.raises(SpecError, match="> 0"):
        load_catalog(overrides={"H100": -1})
    bad = tmp_path / "prices.yaml"
    bad.write_text("accelerators: {X: {price_usd_per_hour: 0}}\n")
    with pytest.raises(SpecError, match="> 0"):
        load_catalog(bad)


def test_ledger_refuses_what_would_pass_the_cap():
    ledger = Ledger(cap_usd=1.0)
    ledger.charge("baseline", 0.1)
    assert ledger.reserve("a", 0.5)
    assert not ledger.reserve("b", 0.5)  # 0.1 + 0.5 + 0.5 > 1
    assert ledger.reserve("b", 0.4)
    assert not ledger.request("a", 0.6)  # would need 0.1 + 0.6 + 0.4
    ledger.update("b", 0.2)
    ledger.settle("b", 0.25)  # b frees 0.15
    assert ledger.request("a", 0.6)
    snap = ledger.snapshot()
    assert snap["spent_usd"] == pytest.approx(0.35)
    assert snap["reserved_usd"] == pytest.approx(0.6)
    assert snap["remaining_usd"] == pytest.approx(0.05)
    assert snap["running"] == 1


def test_ledger_invariant_holds_under_random_traffic():
    """Whatever trials ask for, committed money never exceeds the cap, so neither can spend."""
    rng = random.Random(7)
    ledger = Ledger(cap_usd=10.0)
    open_trials: dict[str, float] = {}
    for i in range(2000):
        action = rng.random()
        if action < 0.3:
            if ledger.reserve(f"t{i}", rng.uniform(0.1, 3)):
                open_trials[f"t{i}"] = 0.0
        elif action < 0.7 and open_trials:
            tid = rng.choice(sorted(open_trials))
            ledger.request(tid, ledger.ceiling(tid) + rng.uniform(0, 2))
            spend = rng.uniform(open_trials[tid], ledger.ceiling(tid))  # trials stay under ceiling
            open_trials[tid] = spend
            ledger.update(tid, spend)
        elif open_trials:
            tid = rng.choice(sorted(open_trials))
            ledger.settle(tid, open_trials.pop(tid))
        snap = ledger.snapshot()
        assert snap["spent_usd"] + snap["reserved_usd"] <= 10.0 + 1e-9
    assert ledger.snapshot()["spent_usd"] <= 10.0


def test_calibration_keeps_the_slowest_measurement():
    ledger = Ledger(cap_usd=1)
    ledger.calibrate(step_s=2.0, closing_s=None)
    ledger.calibrate(step_s=1.5, closing_s=10.0)
    assert ledger.get_timings() == {"step_s": 2.0, "closing_s": 10.0}


def test_cost_model_prior_and_calibrated_predictions():
    # 100M params, 1024 tokens/step on 2 cores at 2.5e10 FLOP/s each: 4*1e8*1024/5e10 = 8.192 s
    model = CostModel(
        price_usd_per_hour=3600.0,
        accelerator="cpu",
        units=2,
        n_params=100_000_000,
        tokens_per_step=1024,
        eval_batches=2,
    )
    t = model.timings({})
    assert t["step_s"] == pytest.approx(8.192)
    assert t["closing_s"] == pytest.approx(1.5 * 8.192 * 2)
    # $1/s: 10 steps + 1 eval + 15 s startup, x1.25 safety
    measured = {"step_s": 1.0, "closing_s": 5.0, "startup_s": 15.0}
    assert model.usd(10, 1, measured) == pytest.approx(1.25 * (15 + 10 + 5))
