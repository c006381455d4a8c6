"""Ctrl-C (SIGINT) on the real CLI mid-sweep (issue 16: the cap holds under Ctrl-C): the driver
process ``lorasweep run`` on its own local Ray, the tiny random-init Llama (it stands in for a
real model in CI). No full-FT trial starts after it (``gate: always``), every account is settled
in the SQL ledger, the parent run ends KILLED with end reason ``interrupted``, exit code 130."""

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


def test_sigint_in_the_lora_phase_settles_everything_and_exits_130(
    tmp_path, tiny_model, small_data
):
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=2.0, max_trials=6).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["full"] = {"max_runs": 1, "gate": "always", "learning_rate": {"value": 1e-4}}
    raw["resources"]["max_concurrent_trials"] = 1
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    db = Path(raw["storage"]["data_dir"]) / "lorasweep.db"
    cli = Path(sys.executable).with_name("lorasweep")
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [str(cli), "run", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        t0 = time.monotonic()
        while not _reported(db):  # the first trial's first report is in the ledger
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < 300, "no trial reported"
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "full fine-tuning" not in out, out
    store = Store(f"sqlite:///{db}")
    sweep_id = store.sweep_ids()[0]
    flat = " ".join(out.split())  # rich wraps long lines
    last = flat[flat.rindex("interrupted sweep") :]
    assert "SIGINT" in flat and last.endswith(f"lorasweep resume {sweep_id}"), out
    assert all(a.settled for a in store.accounts(sweep_id))
    totals = store.totals(sweep_id)
    assert totals.reserved_usd == pytest.approx(0.0) and totals.spent_usd <= 2.0
    from mlflow.tracking import MlflowClient

    from orchestrator import leaderboard

    tracking = f"sqlite:///{Path(raw['storage']['data_dir']) / 'mlflow.db'}"
    parent = leaderboard.find_sweep(tracking, sweep_id)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["lorasweep.end_reason"] == "interrupted"
    children = MlflowClient(tracking).search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert children and all(r.info.status != "RUNNING" for r in children)
    assert all(r.data.params.get("method") != "full" for r in children)


def _reported(db: Path) -> bool:
    if not db.is_file():
        return False
    try:
        store = Store(f"sqlite:///{db}")
        ids = store.sweep_ids()
        return bool(ids) and any(
            a.key != "baseline" and a.spent_usd > 0 for a in store.accounts(ids[0])
        )
    except Exception:  # noqa: BLE001 - the ledger is being created
        return False


@pytest.mark.xfail(
    strict=True,
    reason="known gap (issue 17): after Ctrl-C the resumed LoRA phase starts its next trial and "
    "stops it at once (Tune marks the search finished again); the resume completes with no new "
    "trial. Before the limiter fix in _unfinish_search it hung.",
)
def test_an_interrupted_sweep_resumes_and_runs_its_remaining_trials(
    tmp_path, tiny_model, small_data
):
    """After Ctrl-C, ``lorasweep resume`` goes on proposing trials (Tune saved the stopped search
    as finished; the resumed phase must not take that for the end) and completes."""
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=2.0, max_trials=3).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["resources"]["max_concurrent_trials"] = 1
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    db = Path(raw["storage"]["data_dir"]) / "lorasweep.db"
    cli = Path(sys.executable).with_name("lorasweep")
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [str(cli), "run", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    t0 = time.monotonic()
    while not _reported(db):
        assert proc.poll() is None and time.monotonic() - t0 < 300
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out
    store = Store(f"sqlite:///{db}")
    sweep_id = store.sweep_ids()[0]
    assert store.sweep(sweep_id).state == "interrupted"
    resumed = subprocess.run(
        [str(cli), "resume", sweep_id, "--service-db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert store.sweep(sweep_id).state == "completed"
    from orchestrator import leaderboard

    tracking = f"sqlite:///{Path(raw['storage']['data_dir']) / 'mlflow.db'}"
    rows = leaderboard.trial_rows(tracking, leaderboard.find_sweep(tracking, sweep_id))
    finished = [r for r in rows if r.status != "interrupted"]
    assert len(finished) >= 2, [(r.trial, r.status) for r in rows]  # it ran on after Ctrl-C
    totals = store.totals(sweep_id)
    assert totals.reserved_usd == pytest.approx(0.0) and totals.spent_usd <= 2.0
