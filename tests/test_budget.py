"""Cost arithmetic, the price catalog and the ledger's cap invariant (pure unit tests)."""

from __future__ import annotations

import time

import pytest

from orchestrator.budget import Ledger
from orchestrator.costmodel import CostModel, ModelDims, flops_per_token
from orchestrator.errors import SpecError
from orchestrator.prices import cost_usd, load_catalog, trial_price_usd_per_hour
from workers.memory import ModelShape


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


def test_allowance_is_committed_by_every_unsettled_trial():
    """Each running trial commits its ceiling plus the watchdog's allowance (or its spend, once
    past that); charges and settled trials commit what they spent."""
    ledger = Ledger(cap_usd=1.0, allowance_usd=0.125)
    ledger.charge("baseline", 0.125)
    assert ledger.reserve("a", 0.25)  # commits 0.375
    assert not ledger.reserve("b", 0.5)  # 0.125 + 0.375 + 0.625 > 1
    assert ledger.reserve("b", 0.375)  # 0.125 + 0.375 + 0.5 = 1
    assert ledger.snapshot()["remaining_usd"] == 0.0
    ledger.update("a", 0.75)  # past its ceiling + allowance: it commits what it spent
    assert ledger.snapshot()["remaining_usd"] == -0.375
    assert not ledger.request("b", 0.5)
    ledger.settle("a", 0.75)  # settled: commits its spend, no allowance
    ledger.set_allowance(0.0)
    assert ledger.allowance_usd == 0.0
    assert ledger.snapshot()["remaining_usd"] == 1 - 0.125 - 0.75 - 0.375
    assert ledger.request("b", 0.25) and ledger.ceiling("b") == 0.375  # already that high


def test_a_revoked_trial_gets_no_more():
    ledger = Ledger(cap_usd=10.0)
    assert ledger.reserve("a", 1.0)
    ledger.revoke("a")
    assert ledger.revoked("a") and not ledger.revoked("b")
    assert not ledger.request("a", 2.0) and not ledger.request("a", 0.5)
    assert not ledger.resize("a", 3.0)
    assert ledger.resize("a", 0.5) and ledger.ceiling("a") == 0.5  # lowering is always allowed
    ledger.update("a", 0.7)  # it still reports what it spends until it stops
    assert _accounts(ledger) == {"a": {"ceiling_usd": 0.5, "spent_usd": 0.7, "revoked": True}}


def _accounts(ledger) -> dict:
    """``open_accounts`` less each spend's age (a clock reading: tested on its own below)."""
    out = ledger.open_accounts()
    for acct in out.values():
        assert acct.pop("reported_s_ago") >= 0.0
    return out


def test_open_accounts_say_how_long_ago_each_spend_came():
    ledger = Ledger(cap_usd=10.0, allowance_usd=0.5)
    assert ledger.reserve("a", 1.0) and ledger.reserve("b", 1.0)
    ledger.update("a", 0.25)
    time.sleep(0.3)
    ledger.update("b", 0.25)
    ledger.update("a", 0.25)  # no new spend: the age runs on from the first report of it
    ages = {k: a["reported_s_ago"] for k, a in ledger.open_accounts().items()}
    assert 0.3 <= ages["a"] < 2.0 and 0.0 <= ages["b"] < ages["a"] - 0.25


def test_open_accounts_and_settle_open():
    ledger = Ledger(cap_usd=10.0, allowance_usd=0.5)
    for tid in ("a", "b", "c"):
        assert ledger.reserve(tid, 1.0)
    ledger.update("a", 0.25)
    ledger.update("b", 1.75)  # past its ceiling
    ledger.settle("c", 0.5)
    assert _accounts(ledger) == {
        "a": {"ceiling_usd": 1.0, "spent_usd": 0.25, "revoked": False},
        "b": {"ceiling_usd": 1.0, "spent_usd": 1.75, "revoked": False},
    }
    assert sorted(ledger.settle_open(at="ceiling")) == ["a", "b"]
    assert ledger.open_accounts() == {}
    assert ledger.trials["a"].spent_usd == 1.0 and ledger.trials["b"].spent_usd == 1.75
    assert ledger.snapshot()["spent_usd"] == pytest.approx(3.25)
    assert ledger.snapshot()["reserved_usd"] == 0.0
    other = Ledger(cap_usd=10.0)
    assert other.reserve("a", 1.0)
    other.update("a", 0.25)
    assert other.settle_open() == ["a"] and other.trials["a"].spent_usd == 0.25
    with pytest.raises(ValueError, match="at="):
        other.settle_open(at="later")


def test_settled_accounts_are_closed_and_ids_are_admitted_once():
    """A settled trial's ceiling no longer moves, and admitting an id twice is refused (it
    would replace an account, and forget what it spent)."""
    ledger = Ledger(cap_usd=10.0)
    assert ledger.reserve("a", 1.0)
    ledger.settle("a", 0.5)
    assert not ledger.request("a", 2.0) and not ledger.resize("a", 2.0)
    assert not ledger.reserve("a", 1.0)
    assert ledger.trials["a"].spent_usd == 0.5 and ledger.ceiling("a") == 1.0
    # the same reservation asked again (Ray retrying a call the restarted actor had written)
    assert ledger.reserve("b", 2.0, predicted_usd=3.0)
    assert ledger.reserve("b", 2.0, predicted_usd=3.0) and ledger.snapshot()["reserved_usd"] == 2.0
    assert not ledger.reserve("b", 2.5)
    ledger.settle("a", 0.75)  # a later, larger final reading is kept: it was spent
    assert ledger.snapshot()["spent_usd"] == 0.75


def test_spot_market_prices_and_sources():
    spot, on_demand = load_catalog(market="spot"), load_catalog()
    assert spot["H100"].price_usd_per_hour == pytest.approx(3.44)
    for name, row in spot.items():
        assert 0 < row.price_usd_per_hour < on_demand[name].price_usd_per_hour
        assert row.source and row.date
    assert load_catalog(market="spot", overrides={"H100": 2.0})["H100"].price_usd_per_hour == 2.0
    with pytest.raises(SpecError, match="unknown market") as err:
        load_catalog(market="reserved")
    assert err.value.field == "prices.market"


def test_calibration_keeps_the_most_conservative_recent_measurement():
    ledger = Ledger(cap_usd=1)
    ledger.calibrate(**{"flops_per_s:lora": 2e12, "closing_s": None})
    ledger.calibrate(**{"flops_per_s:lora": 3e12, "closing_s": 10.0})
    ledger.calibrate(**{"flops_per_s:lora": 1e12, "closing_s": 8.0})
    assert ledger.get_timings() == {"flops_per_s:lora": 1e12, "closing_s": 10.0}
    # a cold start (30 s) prices the next trials until three newer measurements replace it
    for startup_s in (30.0, 5.0, 6.0):
        ledger.calibrate(startup_s=startup_s)
    assert ledger.get_timings()["startup_s"] == 30.0
    ledger.calibrate(startup_s=4.0)
    assert ledger.get_timings()["startup_s"] == 6.0


def test_calibration_persists_per_model_and_accelerator(tmp_path):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    key = ("embedded", "cpux1")
    first = Ledger(cap_usd=1, sweep_id="s1", store_url=url, calibration_key=key)
    measured = {
        "flops_per_s:lora": 5e10,
        "startup_s:lora:fresh": 12.0,
        "save_s:full": 4.0,
        "release_s": 0.5,
        "closing_s:lora": 30.0,
    }
    first.calibrate(**measured)
    later = Ledger(cap_usd=1, sweep_id="s2", store_url=url, calibration_key=key)
    # speeds, startups, saves and release carry over (costmodel.PORTABLE_PREFIXES); closing
    # time depends on each sweep's eval settings, so it does not
    assert later.get_timings() == {k: v for k, v in measured.items() if k != "closing_s:lora"}
    other = Ledger(cap_usd=1, sweep_id="s3", store_url=url, calibration_key=("embedded", "H100x1"))
    assert other.get_timings() == {}


def test_resize_lowers_freely_and_raises_only_within_the_cap():
    ledger = Ledger(cap_usd=1.0)
    assert ledger.reserve("a", 0.3) and ledger.reserve("b", 0.3)
    assert ledger.resize("a", 0.1, predicted_usd=0.5)
    assert ledger.predicted("a") == 0.5
    assert not ledger.resize("b", 0.95)  # 0.1 + 0.95 > 1
    assert ledger.resize("b", 0.9)
    assert ledger.snapshot()["remaining_usd"] == pytest.approx(0.0)


# a Llama shape small enough to count by hand: d=8, 2 layers, kv width 4, mlp 16, vocab 10
TINY = ModelShape(vocab=10, hidden=8, layers=2, intermediate=16, heads=2, kv_heads=1)


def test_flops_per_token_follows_the_formula():
    dims = ModelDims.from_config(_config(TINY), n_params=TINY.n_params)
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate/up 8x16 x2 + down 16x8 = 576; head 10x8
    assert dims.n_matmul == 2 * 576 + 80
    seq = 32
    attention = 12 * 2 * 8 * seq
    assert flops_per_token(dims, "full", seq) == 6 * 1232 + attention
    # LoRA r2 on attn: per layer 2 x ((8+8) + (8+4) + (8+4) + (8+8)) = 112 adapter weights
    assert dims.n_lora(2, "attn") == 2 * 112
    assert flops_per_token(dims, "lora", seq, 2, "attn") == 4 * 1232 + 6 * 224 + attention
    assert flops_per_token(dims, "qlora", seq, 2, "attn") == flops_per_token(
        dims, "lora", seq, 2, "attn"
    )


def _config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
    )


def _cost_model(accelerator="cpu", units=2) -> CostModel:
    dims = ModelDims(n_matmul=100_000_000, layers=10, d_model=512)
    return CostModel(
        price_usd_per_hour=3600.0,  # $1 per second: dollars read as seconds
        accelerator=accelerator,
        units=units,
        dims=dims,
        seq_len=128,
        batch_size=8,
        eval_batches=2,
    )


def test_predictions_are_per_config():
    model = _cost_model("H100", 1)
    small = {"method": "lora", "rank": 4, "target_modules": "attn"}
    big = {"method": "lora", "rank": 64, "target_modules": "all_linear"}
    assert (
        model.usd(small, 10, 1, {})
        < model.usd(big, 10, 1, {})
        < model.usd({"method": "full"}, 10, 1, {})
    )


def test_idle_tails_bill_only_workers_whose_last_trial_ended():
    """What a worker held after its last trial is its idle tail; a worker whose latest trial
    began after its last word (still running, or killed with its process) has none."""
    import time

    from orchestrator.budget import Ledger

    ledger = Ledger(1.0)
    for trial_id in ("a", "b", "c"):
        ledger.reserve(trial_id, 0.1)
    ledger.began("a", "w1")
    ledger.last_word("a", 0.01, "w1")
    ledger.began("b", "w1")  # reused w1, then died without a word
    ledger.began("c", "w2")
    ledger.last_word("c", 0.02, "w2")
    time.sleep(0.05)
    tails = ledger.idle_tails(["a", "b", "c"])
    assert set(tails) == {"w2"} and 0.05 <= tails["w2"] < 5
    assert ledger.final_word("a") == 0.01 and ledger.final_word("b") is None
    assert ledger.spent("c") == 0.02
