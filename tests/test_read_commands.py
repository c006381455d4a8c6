"""Read commands never create a store (issue 22, item 3): run from a folder without results,
``lorasweep status`` / ``leaderboard`` / ``promote`` / ``generate`` create nothing, say where
they looked and how to point at a store (``--data-dir`` / ``LORASWEEP_DATA``), and exit non-zero;
pointed at a real store from another folder, they read it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("lorasweep")
READS = [
    ["status"],
    ["status", "demo"],
    ["leaderboard", "demo"],
    ["promote", "demo"],
    ["generate", "--model", "models:/demo@champion", "3 bed house"],
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORASWEEP_", "MLFLOW_"))}
    return {**env, "RAY_ADDRESS": "", **extra}


def _lorasweep(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120
    )


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("args", READS, ids=lambda a: " ".join(a[:2]))
def test_a_read_command_in_an_empty_folder_creates_nothing_and_says_where(tmp_path, args):
    out = _lorasweep(args, tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0, text
    assert _files(tmp_path) == [], text  # no ./lorasweep-data, no mlflow.db
    assert str(tmp_path / "lorasweep-data" / "mlflow.db") in text  # where it looked
    assert "--data-dir" in text and "LORASWEEP_DATA" in text  # how to point at a store
    assert "Traceback" not in text


def test_an_explicit_tracking_uri_without_a_file_is_not_created(tmp_path):
    db = tmp_path / "elsewhere" / "mlflow.db"
    out = _lorasweep(["status", "--tracking-uri", f"sqlite:///{db}"], tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0 and _files(tmp_path) == [], text
    assert str(db) in text and "--tracking-uri" in text


def test_the_data_dir_env_var_and_flag_find_a_store_from_any_folder(tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "results"
    home.mkdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.create_experiment("somewhere")
    client.set_tag(client.create_run(exp, run_name="x").info.run_id, "lorasweep.kind", "sweep")
    before = _files(home)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_env = _lorasweep(["status"], elsewhere, LORASWEEP_DATA=str(home))
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr
    assert "sweeps" in by_env.stdout and "│ x " in by_env.stdout
    by_flag = _lorasweep(["leaderboard", "nope", "--data-dir", str(home)], elsewhere)
    assert by_flag.returncode != 0 and "no sweep named 'nope'" in by_flag.stdout
    assert _files(elsewhere) == [] and _files(home) == before  # nothing new anywhere


def test_the_service_finds_its_database_in_the_same_data_folder(tmp_path, monkeypatch):
    from orchestrator.service.db import default_data_dir, default_db_url

    monkeypatch.delenv("LORASWEEP_SERVICE_DB", raising=False)
    monkeypatch.setenv("LORASWEEP_DATA", str(tmp_path / "team"))
    assert default_db_url() == f"sqlite:///{tmp_path / 'team' / 'lorasweep.db'}"
    assert default_data_dir() == (tmp_path / "team").resolve()
    monkeypatch.delenv("LORASWEEP_DATA")
    assert default_db_url() == "sqlite:///lorasweep-data/lorasweep.db"
