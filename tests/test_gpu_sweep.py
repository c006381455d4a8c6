"""bench/gpu_sweep.py end to end in its CPU mode (``--short``): the real CLI, a real local Ray,
sqlite MLflow, Optuna and ledger, the tiny random-init Llama; the row is read back from the
stores and the spend checked by the OS's clock. The same script ran the H200 sweep whose rows are
in bench/results/gpu_sweep.json (a gpu-marked test checks them there)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "mode",
    "device",
    "trials",
    "trials_completed",
    "spent_usd",
    "budget_usd",
    "best_score",
    "sweep_wall_s",
    "trials_per_gpu_hour",
    "ray",
}


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_sweep", ROOT / "bench" / "gpu_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "packed"])
def test_short_gpu_sweep_runs_the_cli_and_reads_its_row_back(tmp_path, mode):
    out = tmp_path / "rows.json"
    args = ["--short", "--mode", mode, "--pack-slots", "2", "--work", str(tmp_path / "w")]
    code = _bench().main([*args, "--out", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0, rows
    (row,) = rows
    assert KEYS <= set(row)
    assert row["mode"] == mode and row["device"] == "cpu" and row["ray"] is True
    assert row["trials"] == 2 and row["trials_ended"] == 2, row  # max_trials: 2, none failed
    assert row["trials_completed"] <= row["trials_ended"]
    assert row["end_reason"].startswith("max_trials"), row
    # money: the ledger's spend, the MLflow trials' costs and the OS's clock agree, under the cap
    assert 0 < row["spent_usd"] <= row["budget_usd"]
    assert row["outside_held_usd"] <= row["budget_usd"]
    assert row["outside_wall_usd"] >= row["outside_held_usd"] * 0.95  # held time is inside wall
    assert row["spent_usd"] >= 0.8 * row["outside_held_usd"], row
    assert row["trials_per_gpu_hour"] > 0


def test_recorded_h200_rows_held_the_cap():
    rows = json.loads((ROOT / "bench" / "results" / "gpu_sweep.json").read_text())
    gpu = [r for r in rows if r["device"] != "cpu"]
    assert any(r["mode"] == "single" for r in gpu), rows
    for r in gpu:
        assert KEYS <= set(r) and r["ray"] is True
        assert r["spent_usd"] <= r["budget_usd"] and r["outside_held_usd"] <= r["budget_usd"]
        assert r["outside_wall_usd"] <= r["budget_usd"]
        assert r["trials_completed"] <= r["trials_ended"] <= r["trials"]
        assert r["statuses"].get("failed", 0) == 0, r


def test_bad_mode_is_refused_before_any_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _bench().main(["--mode", "triple", "--short", "--work", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "data-triple").exists()
