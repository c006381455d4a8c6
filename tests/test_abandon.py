"""``lorasweep abandon SWEEP`` on what a dead driver left: a real sqlite ledger store and a real
sqlite MLflow store, written as the driver writes them (its sweep row, a heartbeat gone stale,
accounts open), then abandoned through the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from orchestrator.lifecycle import STALE_S
from orchestrator.store import Store
from orchestrator.tracking import KIND_TAG, NOTE_TAG, STATUS_TAG, Tracker

ROOT = Path(__file__).resolve().parents[1]
PRICE = 36.0  # $/h: a cent a second


def _dead_sweep(tmp_path: Path) -> tuple[str, str]:
    db_url = f"sqlite:///{tmp_path / 'lorasweep.db'}"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = Store(db_url)
    store.open_sweep("dead-1", "dead", 1.0)
    fields = {"ceiling_usd": 0.3, "settled": False, "charge": False}
    store.save_account("dead-1", "t1", spent_usd=0.12, **fields)  # was beating
    store.save_account("dead-1", "t2", spent_usd=0.0, **fields)  # reserved, never started
    store.set_sweep("dead-1", state="running", driver_heartbeat_unix=time.time() - STALE_S - 5)
    store.close()
    tracker = Tracker(mlflow_uri, "dead")
    params = {"budget_usd": 1.0, "price_usd_per_hour": PRICE}
    tracker.start_sweep("dead-1", {"name": "dead"}, params)
    tracker.start_trial("dead-1", "trial-001", "t1", {"method": "lora", "rank": 8})
    return db_url, mlflow_uri


def test_abandon_settles_the_dead_drivers_accounts_and_closes_its_runs_killed(tmp_path):
    db_url, mlflow_uri = _dead_sweep(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "abandon", "dead-1",
         "--service-db", db_url, "--tracking-uri", mlflow_uri],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

    store = Store(db_url)
    row = store.sweep("dead-1")
    accounts = {a.key: a for a in store.accounts("dead-1")}
    store.close()
    assert row.state == "cancelled" and row.end_reason == "abandoned"
    assert all(a.settled for a in accounts.values())
    assert accounts["t1"].spent_usd >= 0.12  # never below what it reported
    assert accounts["t2"].spent_usd == 0.0  # never started: nothing billed

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("dead").experiment_id])
    parent = next(r for r in runs if r.data.tags.get(KIND_TAG) == "sweep")
    trial = next(r for r in runs if r.data.tags.get(KIND_TAG) == "trial")
    assert parent.info.status == "KILLED" and trial.info.status == "KILLED"
    assert parent.data.tags[STATUS_TAG] == "cancelled"
    assert parent.data.tags["lorasweep.end_reason"] == "abandoned"
    # its description no longer says it is running: it says how it ended
    note = parent.data.tags[NOTE_TAG]
    assert "cancelled" in note and "running" not in note.split("\n")[0]
    assert "abandoned" in note


def test_abandoning_a_sweep_that_is_not_unfinished_is_refused_naming_its_state(tmp_path):
    db_url, mlflow_uri = _dead_sweep(tmp_path)
    store = Store(db_url)
    store.set_sweep("dead-1", state="completed")
    store.close()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "abandon", "dead-1",
         "--service-db", db_url, "--tracking-uri", mlflow_uri],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "completed" in done.stdout + done.stderr
