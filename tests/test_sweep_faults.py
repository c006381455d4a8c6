"""Faults of the sweep's own services mid-sweep (issue 16 item 5), with the real parts: local Ray,
a real ``mlflow server`` process, the sqlite ledger. The tiny random-init Llama stands in for a
real model (CI has no GPU and no model hub); nothing else is faked.

- the ledger actor's process is SIGKILLed: Ray restarts it, it rebuilds from SQL, the sweep ends
  normally, within its cap, with every account settled;
- the MLflow server dies: the sweep stops, every account settled, the cause in one line
  (``SweepAborted``), instead of Tune raising with reservations open;
- the MLflow server is down for a while and comes back: the trials train on meanwhile (their
  results wait in the driver's outbox), the sweep completes and no metric point is lost.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from outside_clock import ProcessMeter, own_pids
from rich.console import Console
from test_sweep_e2e import _spec

from orchestrator.spec import parse_spec
from orchestrator.store import Store
from orchestrator.sweep import SweepAborted, run_sweep

pytestmark = pytest.mark.slow
PRICE = 36.0  # the specs' "cpu" override: one cent per second


def _ledger_db(spec) -> str:
    return f"sqlite:///{spec.storage.data_dir / 'lorasweep.db'}"


def _when(predicate, then, timeout_s: float = 300) -> threading.Thread:
    """Run ``then()`` in a thread as soon as ``predicate()`` holds."""

    def watch():
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            try:
                if predicate():
                    then()
                    return
            except Exception:  # noqa: BLE001 - the ledger db may not exist yet
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _reports(url: str) -> int:
    store = Store(url)
    ids = store.sweep_ids()
    return len(store.spend_history(ids[0])) if ids else 0


def test_a_killed_ledger_actor_comes_back_from_sql_and_the_sweep_ends_within_its_cap(
    tmp_path, tiny_model, small_data, ray_local
):
    spec = _spec(tmp_path, tiny_model, small_data, budget_usd=1.0, max_trials=3)
    url = _ledger_db(spec)
    before = own_pids("ray::Ledger")
    killed: list[int] = []

    def kill_ledger():
        pids = own_pids("ray::Ledger") - before
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    watcher = _when(lambda: _reports(url) >= 4, kill_ledger)
    with ProcessMeter() as meter:
        result = run_sweep(spec, Console(file=io.StringIO()))
    watcher.join(timeout=1)
    assert meter.cost_usd(PRICE) <= spec.budget_usd
    assert killed, "the ledger actor was never killed: the sweep ended too early"
    totals = Store(url).totals(result.sweep_id)
    assert totals.spent_usd == pytest.approx(result.spent_usd)
    assert totals.reserved_usd == pytest.approx(0.0)
    assert 0 < result.spent_usd <= spec.budget_usd
    assert sum(r.cost_usd for r in result.rows) <= result.spent_usd + 1e-9
    assert len(result.rows) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow(port: int, root: Path) -> subprocess.Popen:
    """A real ``mlflow server`` on ``port`` with its store under ``root``, once it answers."""
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import urllib.request

    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = _start_mlflow(port, tmp_path)
    yield f"http://127.0.0.1:{port}", proc
    _stop(proc)


def test_mlflow_lost_mid_sweep_stops_it_with_every_account_settled(
    tmp_path, tiny_model, small_data, ray_local, mlflow_server, monkeypatch
):
    url, proc = mlflow_server
    monkeypatch.setenv("LORASWEEP_MLFLOW_OUTAGE_S", "20")  # gone for good, not a restart
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=1.0, max_trials=6).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["storage"]["mlflow_tracking_uri"] = url
    spec = parse_spec(raw)
    ledger_url = _ledger_db(spec)
    watcher = _when(lambda: _reports(ledger_url) >= 3, lambda: os.killpg(proc.pid, signal.SIGKILL))
    console = Console(file=io.StringIO(), width=300)
    t0 = time.monotonic()
    with ProcessMeter() as meter, pytest.raises(SweepAborted) as err:
        run_sweep(spec, console)
    watcher.join(timeout=1)
    assert meter.cost_usd(PRICE) <= spec.budget_usd
    message = str(err.value)
    assert "every account settled" in message and "\n" not in message
    assert time.monotonic() - t0 < 240
    store = Store(ledger_url)
    sweep_id = store.sweep_ids()[0]
    totals = store.totals(sweep_id)
    assert totals.reserved_usd == pytest.approx(0.0)
    assert all(a.settled for a in store.accounts(sweep_id))
    assert totals.spent_usd <= spec.budget_usd


def test_mlflow_down_for_a_while_loses_nothing_and_stalls_no_trial(
    tmp_path, tiny_model, small_data, ray_local, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from orchestrator import leaderboard

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = _free_port()
    server = {"proc": _start_mlflow(port, tmp_path)}
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=2.0, max_trials=2).model_dump(
        mode="json"
    )
    raw["search_space"].pop("preset")
    raw["resources"]["max_concurrent_trials"] = 2
    raw["trial"].update(max_steps=12, eval_every=2)
    raw["storage"]["mlflow_tracking_uri"] = f"http://127.0.0.1:{port}"
    spec = parse_spec(raw)
    ledger_url = _ledger_db(spec)
    down_s = 20.0

    def outage() -> None:  # down once both trials report, back on the same port and store
        _stop(server["proc"])
        time.sleep(down_s)
        server["proc"] = _start_mlflow(port, tmp_path)

    watcher = _when(lambda: _reports(ledger_url) >= 4, outage)
    console = Console(file=io.StringIO(), width=300)
    try:
        result = run_sweep(spec, console)
        watcher.join(timeout=60)
        tracking = f"http://127.0.0.1:{port}"
        rows = leaderboard.trial_rows(tracking, leaderboard.find_sweep(tracking, result.sweep_id))
        client = MlflowClient(tracking)
        histories = {
            r.trial: sorted(m.step for m in client.get_metric_history(r.run_id, "score"))
            for r in rows
        }
    finally:
        _stop(server["proc"])
    out = console.file.getvalue()
    assert not watcher.is_alive(), "the outage never happened"
    assert len(rows) == 2, out
    # no trial waited on MLflow until its grant ran out: none was stopped or killed for money
    assert all(r.status == "completed" for r in rows), ([(r.trial, r.status) for r in rows], out)
    for trial, steps in histories.items():  # every eval of every trial reached MLflow, once
        assert steps == spec.eval_steps, (trial, steps)
    totals = Store(ledger_url).totals(result.sweep_id)
    assert totals.reserved_usd == pytest.approx(0.0) and totals.spent_usd <= spec.budget_usd
