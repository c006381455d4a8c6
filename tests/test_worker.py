"""The worker's training loop without Ray (as it runs on a GPU machine): reports, adapter saves,
and the graceful stop inside a budget ceiling. Uses the tiny random-init Llama."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from workers.train import FixedBudget, run_trial


def test_trial_reports_every_interval_and_saves_the_adapter(trial_config):
    reports = []

    def report(metrics: dict, adapter_dir: Path) -> None:
        assert (adapter_dir / "adapter_model.safetensors").is_file()
        reports.append(metrics)

    last = run_trial(trial_config(price_usd_per_hour=1.0), report)
    assert [r["step"] for r in reports] == [2, 4, 6]
    assert [r["status"] for r in reports] == ["running", "running", "completed"]
    assert last is reports[-1]
    # cumulative billing: monotone, and cost = price x billed hours
    assert all(a["billed_s"] < b["billed_s"] for a, b in zip(reports, reports[1:], strict=False))
    assert last["cost_usd"] == pytest.approx(last["billed_s"] / 3600, rel=1e-3)
    assert [s for s, _ in last["train_loss_steps"]] == [5, 6]
    assert all(math.isfinite(r["eval_loss"]) and 0 <= r["score"] <= 1 for r in reports)
    assert last["tokens"] > 0


def test_trial_stops_inside_its_ceiling(trial_config):
    """At $36/h (1 cent per second) and a 6-cent ceiling the trial cannot finish 400 steps: it
    closes with a final eval and save, and what it reports never exceeds the ceiling."""
    reports = []
    budget = FixedBudget(ceiling_usd=0.06)
    cfg = trial_config(price_usd_per_hour=36.0, max_steps=400, eval_every=100)
    last = run_trial(cfg, lambda m, d: reports.append(m), budget)
    assert last["status"] == "budget_stopped"
    assert 0 < last["step"] < 400
    assert reports and reports[-1] is last
    assert last["cost_usd"] <= budget.ceiling_usd


def test_trial_keeps_room_for_its_release_inside_the_ceiling(trial_config):
    """What is billed after the last report (the sweep releasing the trial) must fit as well:
    at 1 cent per second, 2 s of release leave 2 cents of the 6-cent ceiling unspent."""
    budget = FixedBudget(ceiling_usd=0.06)
    cfg = trial_config(price_usd_per_hour=36.0, max_steps=400, eval_every=100, release_s=2.0)
    last = run_trial(cfg, lambda m, d: None, budget)
    assert last["status"] == "budget_stopped"
    assert last["cost_usd"] + 2.0 * 0.01 <= budget.ceiling_usd


def test_trial_refused_at_its_first_step_runs_no_eval_and_no_save(trial_config, monkeypatch):
    """Setup (load, tokenise) took longer than predicted: at $1/s the 10-cent ceiling is gone
    before the first step. The trial must close at once: no eval, no save, no report (the code
    before issue 16 ran a full eval and save after 0 steps and reported $0.50). The real eval and
    save are wrapped to count their calls."""
    from workers import evaluate, lora

    calls = []
    for module, name in ((evaluate, "evaluate"), (lora, "save_adapter")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k)
        )
    reports = []
    budget = FixedBudget(ceiling_usd=0.10)
    cfg = trial_config(price_usd_per_hour=3600.0, prior_step_s=0.01, prior_closing_s=0.01)
    last = run_trial(cfg, lambda m, d: reports.append(m), budget)
    assert reports == []
    assert last["status"] == "budget_stopped" and last["step"] == 0
    assert last.get("phases_s", {}).get("eval", 0.0) == 0.0
    assert last.get("phases_s", {}).get("checkpoint", 0.0) == 0.0
    assert calls == []


def test_trial_that_cannot_pay_its_startup_does_not_load(trial_config):
    """``FixedBudget`` tiny at a high price: the predicted startup alone passes the ceiling, so
    the trial returns before loading anything; elapsed x price, by the test's own clock, stays
    under the ceiling."""
    import time

    reports = []
    budget = FixedBudget(ceiling_usd=0.10)
    cfg = trial_config(price_usd_per_hour=3600.0, prior_startup_s=0.5, release_s=0.0)
    t0 = time.monotonic()
    last = run_trial(cfg, lambda m, d: reports.append(m), budget)
    elapsed_s = time.monotonic() - t0
    assert reports == [] and last["status"] == "budget_stopped" and last["step"] == 0
    assert elapsed_s * 3600.0 / 3600 <= budget.ceiling_usd
    assert last["cost_usd"] <= budget.ceiling_usd
