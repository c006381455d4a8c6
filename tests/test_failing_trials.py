"""Trials that fail in their own code (issue 17): a NaN loss ends the trial ``failed`` with the
reason in MLflow and FAIL in Optuna, its account settled, and the sweep goes on. Real local Ray,
sqlite MLflow and Optuna; the tiny random-init Llama stands in for a real model; the NaN comes
from the worker's fault hook (``workers/faults.py``, off unless ``LORASWEEP_FAULT`` is set)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_sweep_e2e import _spec

from orchestrator.spec import parse_spec
from orchestrator.store import Store
from orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow


def test_nan_trials_fail_in_optuna_and_mlflow_and_the_sweep_ends_after_two_in_a_row(
    tmp_path, tiny_model, small_data, ray_local, monkeypatch
):
    import optuna
    from mlflow.tracking import MlflowClient

    from orchestrator import leaderboard

    monkeypatch.setenv("LORASWEEP_FAULT", "nan@3")  # every trial's third step
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=2.0, max_trials=6).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["max_consecutive_failures"] = 2
    raw["resources"]["max_concurrent_trials"] = 1
    spec = parse_spec(raw)
    console = Console(file=io.StringIO(), width=300)
    result = run_sweep(spec, console)
    out = console.file.getvalue()
    assert [r.status for r in result.rows] == ["failed", "failed"], out
    assert result.end_reason.startswith("failures: 2 trials in a row failed"), result.end_reason
    assert "NonFiniteLoss" in result.end_reason
    client = MlflowClient(result.tracking_uri)
    parent = leaderboard.find_sweep(result.tracking_uri, result.sweep_id)
    assert parent.info.status == "FINISHED"
    for row in result.rows:
        run = client.get_run(row.run_id)
        assert run.info.status == "FAILED"
        assert "NonFiniteLoss" in run.data.tags["lorasweep.error"]
        assert "step 3" in run.data.tags["lorasweep.error"]
        assert run.data.metrics["cost_usd"] > 0
    study = optuna.load_study(
        study_name=f"{result.sweep_id}-lora",
        storage=f"sqlite:///{spec.storage.data_dir / 'optuna.db'}",
    )
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL] * 2
    store = Store(f"sqlite:///{spec.storage.data_dir / 'lorasweep.db'}")
    assert all(a.settled for a in store.accounts(result.sweep_id))
    assert 0 < result.spent_usd <= spec.budget_usd
    # each failed once: not retried from a checkpoint (that is for lost workers)
    assert out.count("retrying") == 0, out
