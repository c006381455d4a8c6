"""Promotion you can trust and ship (issue 21), end to end on the tiny random-init Llama: real
local Ray, sqlite MLflow and Optuna, ``lorasweep promote`` as a user runs it, ``MlflowClient`` to
check what landed, and ``mlflow.pyfunc.load_model`` in a fresh process outside the project.

The sweep ranks by ``eval_loss`` (the tiny model's field score is 0 everywhere); at lr 3 its
eval_loss goes down, then up again, so a trial's best checkpoint is not its last one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import leaderboard
from orchestrator.spec import parse_spec
from orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow
NAME = "promo"
LORASWEEP = str(Path(sys.executable).with_name("lorasweep"))


def _spec(
    tmp: Path,
    base: Path,
    small_data,
    lr: dict,
    max_trials: int,
    max_steps: int,
    eval_every=2,
    alpha: float | None = None,
):
    return parse_spec(
        {
            "name": NAME,
            "budget_usd": 5.0,
            "objective": {"metric": "eval_loss", "mode": "min"},
            "model": {"name_or_path": str(base)},
            "data": {"source": "files", **{k: str(v) for k, v in small_data.items()}},
            "search_space": {
                "preset": "default",
                "rank": {"choices": [4]},
                "target_modules": {"value": "all_linear"},
                "learning_rate": lr,
                **({"alpha": {"value": alpha}} if alpha is not None else {}),
            },
            "trial": {
                "max_steps": max_steps,
                "eval_every": eval_every,
                "batch_size": 4,
                "max_seq_len": 160,
                "eval_examples": 4,
                "max_new_tokens": 8,
            },
            "early_stopping": {"enabled": False},
            "resources": {"accelerator": "cpu", "cpus_per_trial": 1, "max_concurrent_trials": 2},
            "max_trials": max_trials,
            "prices": {"overrides": {"cpu": 36.0}},
            "storage": {"data_dir": str(tmp / "data")},
        }
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, small_data, ray_local):
    """A finished sweep on a copy of the tiny model (the test moves that copy later)."""
    tmp = tmp_path_factory.mktemp("promotion")
    base = tmp / "base-model"
    shutil.copytree(tiny_model, base)
    # lr 100 (alpha 8) overshoots: its eval_loss is lowest at step 2 of 6 and worse after, where
    # it settles (6.309, 6.207, then 6.238 at every later step, run alone on the tiny model); lr
    # 0.5 learns slowly and steadily. (lr 10 with alpha 32, used before, dipped and rose on one
    # machine and went on falling on another: too close to call.)
    spec = _spec(tmp, base, small_data, {"choices": [0.5, 100.0]}, 3, 6, eval_every=1, alpha=8)
    console = Console(file=io.StringIO(), width=200)
    result = run_sweep(spec, console)
    out = console.file.getvalue()
    return {
        "tmp": tmp,
        "base": base,
        "spec": spec,
        "result": result,
        "data": small_data,
        "out": out,
    }


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [LORASWEEP, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_trials_keep_their_best_checkpoint_and_rank_by_eval_loss(world):
    from mlflow.tracking import MlflowClient

    from workers.scoring import score_split

    result, spec = world["result"], world["spec"]
    client = MlflowClient(result.tracking_uri)
    parent = leaderboard.find_sweep(result.tracking_uri, result.sweep_id)
    rows = leaderboard.trial_rows(result.tracking_uri, parent)
    assert len(rows) >= 2 and all(r.best_step is not None for r in rows)
    losses = [r.eval_loss for r in rows]
    assert losses == sorted(losses)  # objective eval_loss, mode min: lowest loss first
    # a trial whose eval_loss got worse after its best eval keeps (and logs) the best one
    kept = None
    for r in rows:
        history = sorted(client.get_metric_history(r.run_id, "eval_loss"), key=lambda m: m.step)
        best = min(history, key=lambda m: m.value)
        assert r.best_step == best.step and r.eval_loss == pytest.approx(best.value)
        if history[-1].value > best.value + 1e-3:
            kept = (r, history[-1].value)
    assert kept is not None, [(r.trial, r.lr, r.best_step) for r in rows]
    row, last_loss = kept
    assert row.best_step < spec.trial.max_steps
    assert (
        f"{row.trial} completed" in world["out"] and f"(kept step {row.best_step}:" in world["out"]
    )
    adapter = client.download_artifacts(row.run_id, "adapter", str(world["tmp"]))
    again = score_split(
        str(world["base"]),
        world["data"]["validation"],
        adapter_dir=adapter,
        max_new_tokens=spec.trial.max_new_tokens,
        max_seq_len=spec.trial.max_seq_len,
        batch_size=spec.trial.batch_size,
    )
    # the saved adapter is the best step's: its eval reproduces that loss, not the last one
    assert again["eval_loss"] == pytest.approx(row.eval_loss, abs=1e-4)
    assert abs(again["eval_loss"] - last_loss) > 1e-3
    board = _cli(
        "leaderboard", result.sweep_id, "--tracking-uri", result.tracking_uri, cwd=world["tmp"]
    )
    assert board.returncode == 0 and "best_step" in board.stdout


def test_promote_registers_the_best_step_as_a_portable_model_without_warnings(world):
    from mlflow.tracking import MlflowClient

    result = world["result"]
    client = MlflowClient(result.tracking_uri)
    best = leaderboard.trial_rows(
        result.tracking_uri, leaderboard.find_sweep(result.tracking_uri, result.sweep_id)
    )[0]
    trial_before = client.get_run(best.run_id)
    out = _cli("promote", result.sweep_id, "--tracking-uri", result.tracking_uri, cwd=world["tmp"])
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "warn" not in text.lower(), text  # no library warnings on the user's terminal
    flat = " ".join(out.stdout.split())
    assert f"registered {NAME} version 1 as @champion:" in flat
    assert f"{best.trial} at step {best.best_step}, by eval_loss min" in flat
    assert "champion version 1: no champion yet" in flat
    # the prompt shape, and a "try it" line with a row of this sweep's own validation data
    first_val = json.loads(Path(world["data"]["validation"]).read_text().splitlines()[0])
    user = next(m["content"] for m in first_val["messages"] if m["role"] == "user")
    assert "prompt format chat, chat template the tokenizer's" in flat
    assert "as the model reads it: <|im_start|>system\\nListing to JSON." in flat
    assert f"lorasweep generate --model models:/{NAME}@champion" in flat
    assert " ".join(user.split())[:40] in flat
    assert "weights sha256" in flat and "MLFLOW_TRACKING_URI=sqlite:////" in flat

    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.tags["trial"] == best.trial and version.tags["best_step"] == str(best.best_step)
    assert version.tags["compare.split"] == "test" and "test_score" in version.tags
    assert version.run_id == best.run_id
    # the trial's run was not reopened: same end time, status, metrics (no test_score there)
    trial_after = client.get_run(best.run_id)
    assert trial_after.info.end_time == trial_before.info.end_time
    assert trial_after.info.status == "FINISHED"
    assert trial_after.data.metrics == trial_before.data.metrics

    import mlflow
    from mlflow.types import DataType

    mlflow.set_tracking_uri(result.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and not list(local.rglob("*.pkl"))  # models-from-code
    requirements = (local / "requirements.txt").read_text().split()
    assert "lorasweep" not in " ".join(requirements)
    assert {r.split("==")[0] for r in requirements if "==" in r} >= {"mlflow", "torch", "peft"}
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_types() == [DataType.string]
    assert {p.name for p in info.signature.params.params} == {"system_prompt", "max_new_tokens"}
    example = json.loads((local / "input_example.json").read_text())
    assert user in json.dumps(example, ensure_ascii=False) or user in str(example)


def test_the_model_loads_in_a_fresh_process_from_a_moved_base_and_refuses_another(world):
    result, base = world["result"], world["base"]
    moved, other = world["tmp"] / "elsewhere" / "copy", world["tmp"] / "other"
    empty = world["tmp"] / "empty-cwd"
    empty.mkdir()
    shutil.copytree(base, other)
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")  # another model's weights
    moved.parent.mkdir()
    base.rename(moved)  # the training machine's path is gone
    script = textwrap.dedent(
        f"""
        import importlib.abc, os, sys
        class NoProject(importlib.abc.MetaPathFinder):  # the model must not need our packages
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("orchestrator", "workers"):
                    raise ImportError("project code imported: " + name)
        sys.meta_path.insert(0, NoProject())
        import mlflow
        uri = "models:/{NAME}@champion"
        for folder, expect in ((None, "LORASWEEP_BASE_MODEL"), ({str(other)!r}, "not the ones")):
            if folder:
                os.environ["LORASWEEP_BASE_MODEL"] = folder
            try:
                mlflow.pyfunc.load_model(uri)
                raise SystemExit("loaded without the right base: " + str(folder))
            except Exception as exc:
                assert expect in str(exc), str(exc)
        os.environ["LORASWEEP_BASE_MODEL"] = {str(moved)!r}
        out = mlflow.pyfunc.load_model(uri).predict(["3 bed house in Austin"])
        print("PREDICTED", type(out[0]).__name__, len(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORASWEEP_BASE_MODEL")}
    env["MLFLOW_TRACKING_URI"] = result.tracking_uri
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=empty,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        moved.rename(base)  # later tests train on it again
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PREDICTED str 1" in done.stdout
    assert not list(empty.iterdir())  # no stray ./mlflow.db where the user stood


def test_a_worse_sweep_leaves_champion_where_it_was_unless_forced(world):
    from mlflow.tracking import MlflowClient

    tmp, result = world["tmp"], world["result"]
    spec = _spec(tmp, world["base"], world["data"], {"value": 1e-5}, 1, 2)  # learns nothing
    worse = run_sweep(spec, Console(file=io.StringIO(), width=200))
    client = MlflowClient(result.tracking_uri)
    assert worse.tracking_uri == result.tracking_uri
    out = _cli("promote", worse.sweep_id, "--tracking-uri", worse.tracking_uri, cwd=tmp)
    flat = " ".join(out.stdout.split())
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"registered {NAME} version 2 as @challenger:" in flat
    assert "champion stays at version 1: not better than version 1: eval_loss" in flat
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    forced = _cli(
        "promote", worse.sweep_id, "--force", "--tracking-uri", worse.tracking_uri, cwd=tmp
    )
    flat = " ".join(forced.stdout.split())
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "registered promo version 3 as @champion:" in flat and "replaces version 1" in flat
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == "3" and version.tags["replaced_version"] == "1"
    # a champion measured elsewhere (here: its records wiped, like one promoted before them) is
    # scored again on the new version's split, not compared across grounds
    for key in [k for k in version.tags if k.startswith("compare.")]:
        client.delete_model_version_tag(NAME, "3", key)
    again = _cli("promote", result.sweep_id, "--tracking-uri", result.tracking_uri, cwd=tmp)
    flat = " ".join(again.stdout.split())
    assert again.returncode == 0, again.stdout + again.stderr
    assert "champion version 4: better than version 3: eval_loss" in flat
    assert "replaces version 3" in flat
    # no SWEEP: refused (the latest sweep of any experiment would be a guess), naming the sweeps
    bare = _cli("promote", "--tracking-uri", result.tracking_uri, cwd=tmp)
    assert bare.returncode == 2 and "SWEEP: say which sweep" in bare.stdout
    assert worse.sweep_id in " ".join(bare.stdout.split())
