"""What the MLflow UI shows of a sweep (issue 22, item 1), on a real sqlite MLflow store, no Ray:
the experiment's kind tag, run descriptions, costs in cents beside dollars, and the system metrics
a trial's worker samples. (The browser's view of the same: tests/test_mlflow_ui_browser.py.)"""

from __future__ import annotations

import os
import sys
import time

import pytest

from orchestrator.run_notes import NOTE_TAG, cents_key, config_summary, money
from orchestrator.system_metrics import SystemSampler
from orchestrator.tracking import EXPERIMENT_KIND_TAG, Tracker, runs_url

SWEEP = "notes-20261201-000000-abcd"
LORA = {
    "method": "lora",
    "rank": 8,
    "alpha": 16.0,
    "target_modules": "attn_mlp",
    "learning_rate": 1e-3,
    "use_rslora": True,
    "predicted_cost_usd": 0.000062,
}


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (its first open creates the tables: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _tracker(uri: str, name: str, tmp_path) -> Tracker:
    return Tracker(uri, name, artifact_root=tmp_path / "artifacts")


def test_the_experiment_is_a_training_experiment_also_when_it_was_made_before(uri, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    fresh = _tracker(uri, "kind-new", tmp_path)
    assert client.get_experiment(fresh.experiment_id).tags[EXPERIMENT_KIND_TAG] == (
        "custom_model_development"
    )
    # an older store's experiment (made without the tag) gets it when a sweep opens it again
    old_id = client.create_experiment("kind-old")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old_id).tags
    _tracker(uri, "kind-old", tmp_path)
    assert client.get_experiment(old_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # a kind someone chose in the UI is theirs
    chosen = client.create_experiment("kind-chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    _tracker(uri, "kind-chosen", tmp_path)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"
    assert runs_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_runs_describe_budget_cost_best_and_how_to_promote(uri, tmp_path):
    t = _tracker(uri, "notes", tmp_path)
    parent = t.start_sweep(
        SWEEP,
        {"name": "notes"},
        {"budget_usd": 0.5, "model": "tiny", "objective": "score", "objective_mode": "max"},
    )
    running = t.client.get_run(parent).data.tags[NOTE_TAG]
    head = running.splitlines()[0]  # what the UI shows before "Show more"
    assert f"Sweep `{SWEEP}`: running." in head and f"`lorasweep promote {SWEEP}`" in head
    assert "Spent $0 of $0.5 (50 cents)." in running and "ranked by score (max)" in running

    t.log_sweep_metrics({"budget_spent_usd": 0.0004, "budget_committed_usd": 0.001}, 1)
    live = t.client.get_run(parent).data.tags[NOTE_TAG]
    assert "Spent $0.0004 (0.04 cents) of $0.5 (50 cents)." in live and "running." in live

    run_id = t.start_trial(SWEEP, "trial-001", "t1", LORA)
    note = t.client.get_run(run_id).data.tags[NOTE_TAG]
    assert note.startswith("**trial-001: running**, predicted cost $6.2e-05 (0.0062 cents).")
    assert "lora r8 alpha 16 attn_mlp lr 1.00e-03 use_rslora" in note
    t.log_trial_result(run_id, {"step": 2, "score": 0.81, "eval_loss": 1.5, "cost_usd": 4e-05})
    t.end_trial(
        run_id,
        "completed",
        {"cost_usd": 0.00123, "billed_s": 99.4, "step": 4, "best_step": 2, "best_score": 0.81},
        None,
    )
    ended = t.client.get_run(run_id).data.tags[NOTE_TAG]
    assert ended.startswith("**trial-001: completed**, cost $0.00123 (0.123 cents), 99 s billed.")
    assert "lora r8 alpha 16 attn_mlp" in ended and "Kept step 2: score 0.81" in ended

    failed = t.start_trial(SWEEP, "trial-002", "t2", {**LORA, "rank": 4})
    t.end_trial(failed, "failed", {"cost_usd": 0.0001, "step": 0}, None, "ValueError: NaN loss\n…")
    assert "Error: ValueError: NaN loss" in t.client.get_run(failed).data.tags[NOTE_TAG]

    t.client.set_tag(parent, "lorasweep.best_run_id", run_id)
    t.client.set_tag(parent, "lorasweep.end_reason", "max_trials: 2 trials ran")
    t.end_sweep("completed", {"spent_usd": 0.00133, "budget_usd": 0.5, "trials": 2}, [])
    final = t.client.get_run(parent).data.tags[NOTE_TAG]
    assert final.splitlines()[0] == (
        f"**Sweep `{SWEEP}`: completed.** Best: trial-001, score 0.81. Promote it (alias "
        f"`champion`): `lorasweep promote {SWEEP}`"
    )
    assert "Spent $0.00133 (0.133 cents) of $0.5 (50 cents)." in final
    assert "| Spent | $0.00133 (0.133 cents) |" in final and "| Trials | 2 |" in final
    assert "| Best | trial-001, score 0.81 (lora r8 alpha 16 attn_mlp" in final
    assert "| Ended | max_trials: 2 trials ran |" in final

    # a resumed sweep's parent says it runs again; a failed one offers no promote
    t2 = _tracker(uri, "notes", tmp_path)
    t2.attach_sweep(SWEEP)
    assert "running" in t2.client.get_run(parent).data.tags[NOTE_TAG]
    t2.end_sweep("failed", {"spent_usd": 0.00133, "cap_usd": 0.5}, [])
    failed_note = t2.client.get_run(parent).data.tags[NOTE_TAG]
    assert "failed" in failed_note and "promote" not in failed_note


def test_a_crashed_parts_open_trial_is_described_when_closed(uri, tmp_path):
    t = _tracker(uri, "closing", tmp_path)
    t.start_sweep("closing-1", {}, {"budget_usd": 1.0})
    run_id = t.start_trial("closing-1", "trial-001", "t1", LORA)
    assert t.close_open_trials("interrupted", {"t1": 0.0004}) == [run_id]
    note = t.client.get_run(run_id).data.tags[NOTE_TAG]
    assert note.startswith("**trial-001: interrupted**, cost $0.0004 (0.04 cents).")


def test_dollar_metrics_and_params_get_cents_twins_beside_them(uri, tmp_path):
    t = _tracker(uri, "cents", tmp_path)
    parent = t.start_sweep("cents-1", {}, {"budget_usd": 0.25, "price_usd_per_hour": 0.0446})
    run_id = t.start_trial("cents-1", "trial-001", "t1", LORA)
    t.log_trial_result(run_id, {"step": 2, "score": 0.5, "cost_usd": 0.00006})
    t.log_sweep_metrics({"budget_spent_usd": 0.00006, "budget_committed_usd": 0.0002}, 1)
    t.end_sweep("completed", {"spent_usd": 0.00006, "best_cost_usd_lora": 0.00006}, [])

    trial = t.client.get_run(run_id).data
    assert trial.metrics["cost_usd"] == pytest.approx(0.00006)  # the dollar keys stay
    assert trial.metrics["cost_cents"] == pytest.approx(0.006)
    assert float(trial.params["predicted_cost_cents"]) == pytest.approx(0.0062)
    sweep = t.client.get_run(parent).data
    assert float(sweep.params["budget_cents"]) == 25.0 and sweep.params["budget_usd"] == "0.25"
    assert float(sweep.params["price_cents_per_hour"]) == pytest.approx(4.46)
    for key, cents in {
        "spent_cents": 0.006,
        "best_cost_cents_lora": 0.006,
        "budget_spent_cents": 0.006,
        "budget_committed_cents": 0.02,
    }.items():
        assert sweep.metrics[key] == pytest.approx(cents), key
    assert [cents_key(k) for k in ("billed_s", "usda_x", "cost_usd")] == [None, None, "cost_cents"]
    assert money(12.345) == "$12.35" and money(0.0) == "$0"
    assert config_summary({"method": "full", "learning_rate": "2e-05"}) == "full lr 2.00e-05"


def test_system_metrics_a_worker_samples_land_on_the_trial_run(uri, tmp_path):
    t = _tracker(uri, "system", tmp_path)
    t.start_sweep("system-1", {}, {"budget_usd": 1.0})
    run_id = t.start_trial("system-1", "trial-001", "t1", LORA)
    with SystemSampler(interval_s=0.05) as sampler:
        deadline = time.monotonic() + 5
        while len({s[3] for s in sampler._samples}) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        first = sampler.drain()
        second = sampler.drain()  # what was sampled since (one, taken by the drain)
    t.log_trial_result(run_id, {"step": 2, "score": 0.5, "system_metrics": first})
    t.log_trial_result(run_id, {"step": 4, "score": 0.6, "system_metrics": second})
    history = t.client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) == len({s[3] for s in first + second}) >= 4
    assert [m.step for m in history] == sorted(m.step for m in history)
    assert all(0 <= m.value <= 100 for m in history)
    memory = t.client.get_run(run_id).data.metrics["system/system_memory_usage_megabytes"]
    assert memory > 10  # this process alone uses more


def test_the_sampler_without_nvml_samples_cpu_and_memory_and_stops_at_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as where nvidia-ml-py is not installed
    sampler = SystemSampler(interval_s=60)
    with sampler:
        thread = sampler._thread
        busy_until = time.monotonic() + 0.5
        while time.monotonic() < busy_until:  # one core busy: the reading is not ~0
            pass
        samples = sampler.drain()
        started = time.perf_counter()
        for _ in range(20):
            sampler.sample()
        per_sample_s = (time.perf_counter() - started) / 20
        stop_at = time.perf_counter()
    stop_s = time.perf_counter() - stop_at
    keys = {s[0] for s in samples}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_percentage"} <= keys
    assert not any("gpu" in k for k in keys)
    cpu = [v for k, v, *_ in samples if k == "system/cpu_utilization_percentage"]
    assert len(cpu) == 1 and 100 / (os.cpu_count() or 1) * 0.5 <= cpu[0] <= 100
    assert per_sample_s < 0.005  # nothing next to a training step (seconds on CPU)
    assert stop_s < 0.5  # a 60 s interval does not hold the trial's end
    assert thread is not None and not thread.is_alive()


def test_sampling_is_off_with_a_zero_interval():
    with SystemSampler(interval_s=0) as sampler:
        assert sampler.drain() == [] and sampler._thread is None


def test_a_retried_trials_system_metrics_go_on_after_the_lost_attempts_steps():
    """A retry logs to the same run: its samples must not reuse the lost attempt's steps (the
    fault benchmark found 3 repeated system/... steps after a worker SIGKILL)."""
    with SystemSampler(interval_s=60) as first:
        first.sample()
        lost_steps = {step for *_, step in first.drain()}  # two samples: this and the drain's
    with SystemSampler(interval_s=60) as retry:
        retry.continue_after(prior_billed_s=0.5)  # the lost attempt billed half a second
        steps = {step for *_, step in retry.drain()}
    assert len(lost_steps) == 2 and steps and steps.isdisjoint(lost_steps)
