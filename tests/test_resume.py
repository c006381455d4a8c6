"""Sweeps survive their driver (issue 17): ``lorasweep run`` SIGKILLed mid-sweep, then
``lorasweep resume``, both the real CLI in their own processes with their own local Ray; sqlite
MLflow, Optuna and ledger; the tiny random-init Llama stands in for a real model (CI has no GPU
and no model hub)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_sweep_e2e import _spec

from orchestrator.store import Store

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).with_name("lorasweep"))
BUDGET_USD = 3.0


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "", "LORASWEEP_DRIVER_STALE_S": "3"}


def _reports(db: Path) -> int:
    """Trials that have spent something (a heartbeat or a report) in the ledger."""
    if not db.is_file():
        return 0
    try:
        store = Store(f"sqlite:///{db}")
        ids = store.sweep_ids()
        accounts = store.accounts(ids[0]) if ids else []
        return sum(a.key != "baseline" and a.spent_usd > 0 for a in accounts)
    except Exception:  # noqa: BLE001 - the ledger is being created
        return 0


def _kill_driver_when(proc, predicate, timeout_s: float = 300) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - t0 < timeout_s, "the sweep never got there"
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    try:  # its local Ray cluster, as a reboot would take it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_killed_driver_resumes_with_one_parent_run_no_duplicates_and_spend_under_the_cap(
    tmp_path, tiny_model, small_data
):
    import optuna
    from mlflow.tracking import MlflowClient

    from orchestrator import leaderboard

    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=BUDGET_USD, max_trials=4).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["resources"]["max_concurrent_trials"] = 1
    raw["trial"].update(max_steps=8, eval_every=2)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    data = Path(raw["storage"]["data_dir"])
    db = data / "lorasweep.db"
    first = subprocess.Popen(
        [CLI, "run", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    _kill_driver_when(first, lambda: _reports(db) >= 2)
    store = Store(f"sqlite:///{db}")
    sweep_id = store.sweep_ids()[0]
    spent_before = store.totals(sweep_id).spent_usd
    time.sleep(4)  # the dead driver's heartbeat goes stale

    shown = subprocess.run(  # the sweep reads interrupted, not the MLflow tag's "running"
        [
            CLI,
            "status",
            sweep_id,
            "--service-db",
            f"sqlite:///{db}",
            "--tracking-uri",
            f"sqlite:///{data / 'mlflow.db'}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    flat = " ".join(shown.stdout.split())
    assert f"{sweep_id} interrupted" in flat and f"lorasweep resume {sweep_id}" in flat, flat

    refused = subprocess.run(
        [CLI, "run", str(spec_path)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert refused.returncode == 2
    assert f"lorasweep resume {sweep_id}" in " ".join(refused.stdout.split()), refused.stdout

    resumed = subprocess.run(
        [CLI, "resume", sweep_id, "--service-db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    totals = Store(f"sqlite:///{db}").totals(sweep_id)
    assert spent_before <= totals.spent_usd <= BUDGET_USD
    assert totals.reserved_usd == pytest.approx(0.0)
    assert Store(f"sqlite:///{db}").sweep(sweep_id).state == "completed"

    tracking = f"sqlite:///{data / 'mlflow.db'}"
    client = MlflowClient(tracking)
    parents = [r for r in leaderboard.sweep_runs(tracking) if r.info.run_name == sweep_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(
        [parents[0].info.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    trial_ids = [r.data.tags["lorasweep.trial_id"] for r in children]
    assert len(trial_ids) == len(set(trial_ids))  # no trial has two child runs
    assert all(r.info.status != "RUNNING" for r in children)
    # a trial the dead driver started after Tune last saved its experiment is lost (closed as
    # interrupted, its spend counted); every other trial ran once, max_trials in all
    lost = [r for r in children if r.data.tags["lorasweep.status"] == "interrupted"]
    assert len(lost) <= 1 and len(children) - len(lost) == 4, [r.info.run_name for r in children]
    for run in children:  # no metric step logged twice
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "score")]
        assert len(steps) == len(set(steps)), (run.info.run_name, steps)
    priors = [
        r
        for r in children
        if float(r.data.params["learning_rate"]) == pytest.approx(1e-2)
        and r.data.params["rank"] == "4"
    ]
    assert len(priors) == 1  # the priors' first trial was not run again
    study = optuna.load_study(
        study_name=f"{sweep_id}-lora", storage=f"sqlite:///{data / 'optuna.db'}"
    )
    trials = study.get_trials(deepcopy=False)
    # every trial once in the study (one Optuna trial per child run), none left RUNNING
    assert len(trials) == len(children) and all(t.state.is_finished() for t in trials)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) >= len(lost)
    assert "resuming" in resumed.stdout


def test_a_resume_without_saved_tune_state_runs_only_the_trials_left(
    tmp_path, tiny_model, small_data
):
    """A driver killed before Tune first saved its experiment (here: the folder removed after the
    kill) leaves trials in MLflow and Optuna but nothing to restore: the resumed sweep starts a
    new Tune run for what is left of ``max_trials``, not ``max_trials`` more."""
    import shutil

    from orchestrator import leaderboard

    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=BUDGET_USD, max_trials=3).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["resources"]["max_concurrent_trials"] = 1
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    data = Path(raw["storage"]["data_dir"])
    db = data / "lorasweep.db"
    first = subprocess.Popen(
        [CLI, "run", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    _kill_driver_when(first, lambda: _reports(db) >= 2)
    store = Store(f"sqlite:///{db}")
    sweep_id = store.sweep_ids()[0]
    shutil.rmtree(data / "ray" / f"{sweep_id}-lora")  # as if Tune had never saved it
    time.sleep(4)  # the dead driver's heartbeat goes stale
    resumed = subprocess.run(
        [CLI, "resume", sweep_id, "--service-db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    tracking = f"sqlite:///{data / 'mlflow.db'}"
    rows = leaderboard.trial_rows(tracking, leaderboard.find_sweep(tracking, sweep_id))
    # the killed driver's two trials (closed as interrupted) and one more: three in all
    assert len(rows) == 3, [(r.trial, r.status) for r in rows]
    totals = Store(f"sqlite:///{db}").totals(sweep_id)
    assert totals.reserved_usd == pytest.approx(0.0) and totals.spent_usd <= BUDGET_USD
