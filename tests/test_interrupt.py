"""Ctrl-C (SIGINT) on the real CLI mid-sweep (issue 16: the cap holds under Ctrl-C): the driver
process ``lorasweep run`` on its own local Ray, the tiny random-init Llama (it stands in for a
real model in CI). No full-FT trial starts after it (``gate: always``), every account is settled
in the SQL ledger, the parent run ends KILLED with end reason ``interrupted``, exit code 130."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_sweep_e2e import _spec

from orchestrator.store import Store

pytestmark = pytest.mark.slow


def _run_and_interrupt(
    tmp_path, raw: dict, when: re.Pattern | None = None
) -> tuple[str, int, Path]:
    """Start ``lorasweep run`` on spec ``raw`` as a user would, send SIGINT once a line matches
    ``when`` (by default: a trial has printed its first eval, it is past its first report,
    training on), and wait for the driver to end: (output, exit code, the ledger's sqlite
    file)."""
    when = when or FIRST_EVAL
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    db = Path(raw["storage"]["data_dir"]) / "lorasweep.db"
    proc = subprocess.Popen(
        [str(CLI), "run", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        t0 = time.monotonic()
        while not any(when.search(line) for line in list(lines)):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() - t0 < 300, "no trial reported: " + "".join(lines)
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(lines), proc.returncode, db


FIRST_EVAL = re.compile(r"trial-\d+ step +\d+ +score")
CLI = Path(sys.executable).with_name("lorasweep")
ENV = {**os.environ, "RAY_ADDRESS": ""}


def test_sigint_in_the_lora_phase_settles_everything_and_exits_130(
    tmp_path, tiny_model, small_data, monkeypatch
):
    # steps after the first eval take a second (workers/faults.py): the trial is still training
    # when SIGINT comes, and closes with a final eval of what it trained since
    monkeypatch.setitem(ENV, "LORASWEEP_FAULT", "slow@3")
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=2.0, max_trials=6).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["full"] = {"max_runs": 1, "gate": "always", "learning_rate": {"value": 1e-4}}
    raw["resources"]["max_concurrent_trials"] = 1
    raw["trial"]["max_steps"] = 12
    out, returncode, db = _run_and_interrupt(tmp_path, raw)
    assert returncode == 130, out
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
    # the trial running at Ctrl-C closed inside its grant: a final eval after the report that
    # was in the ledger when SIGINT was sent, and its adapter saved with it
    closed = [r for r in children if r.data.tags.get("lorasweep.status") == "interrupted"]
    assert closed, (out, [(r.info.run_name, r.data.tags.get("lorasweep.status")) for r in children])
    client = MlflowClient(tracking)
    for run in closed:
        assert run.info.status == "KILLED"
        scores = client.get_metric_history(run.info.run_id, "score")
        assert len(scores) >= 2, (run.info.run_name, [(m.step, m.value) for m in scores])
        assert client.list_artifacts(run.info.run_id), run.info.run_name  # the adapter


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
    out, returncode, db = _run_and_interrupt(tmp_path, raw)
    assert returncode == 130, out
    store = Store(f"sqlite:///{db}")
    sweep_id = store.sweep_ids()[0]
    assert store.sweep(sweep_id).state == "interrupted"
    resumed = subprocess.run(
        [str(CLI), "resume", sweep_id, "--service-db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        env=ENV,
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


def test_sigint_between_the_base_eval_and_the_first_trial_ends_the_sweep(
    tmp_path, tiny_model, small_data
):
    """Ctrl-C once the base model is scored, before Tune started a trial: no trial starts, the
    driver exits 130 with every account settled (it used to wait for a trial forever)."""
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=2.0, max_trials=3).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    out, returncode, db = _run_and_interrupt(tmp_path, raw, re.compile(r"base model score"))
    assert returncode == 130, out
    assert not re.search(r"trial-\d+ started", out), out
    store = Store(f"sqlite:///{db}")
    sweep_id = store.sweep_ids()[0]
    assert store.sweep(sweep_id).state == "interrupted"
    assert all(a.settled for a in store.accounts(sweep_id))
    assert store.totals(sweep_id).reserved_usd == pytest.approx(0.0)
