"""A trial that goes on from its checkpoint reports again the steps its lost attempt reported
after that checkpoint (issue 17): a driver SIGKILLed after logging step 4 of a trial whose last
checkpoint Tune had recorded at step 2 resumes it from step 2, and the fault benchmark found its
steps 3-4 logged twice. The child run must keep one point per step, whichever attempt reports
it. Real sqlite MLflow; the results are what the trainable reports.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from orchestrator.tracking import Tracker


def _result(step: int, eval_every: int = 2) -> dict:
    """What the trainable reports at an eval: the train losses since its last report, the eval
    metrics and the system metrics sampled since (numbered by the sampler, here = step)."""
    return {
        "step": step,
        "train_loss_steps": [(s, 1.0 / s) for s in range(step - eval_every + 1, step + 1)],
        "score": 0.1 * step,
        "eval_loss": 1.0 / step,
        "cost_usd": 0.01 * step,
        "system_metrics": [("system/cpu_utilization_percentage", 50.0, 1_000 + step, step)],
    }


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_resumed_trial_logs_each_step_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "steps", artifact_root=tmp_path / "artifacts")
    tracker.start_sweep("s1", {}, {})
    run_id = tracker.start_trial("s1", "trial-001", "t1", {"learning_rate": 1e-3})
    first: dict[str, int] = {}
    for step in (2, 4):  # the first part's driver logs steps 1-4, then dies
        tracker.log_trial_result(run_id, _result(step), first)
    assert first["score"] == 4 and first["train_loss"] == 4

    # the resumed part reads what the run holds, and Tune replays the trial from step 2
    again = Tracker(uri, "steps").logged_steps(run_id)
    assert again == first
    for step in (4, 6, 8):
        tracker.log_trial_result(run_id, _result(step), again)

    client = MlflowClient(uri)
    assert _steps(client, run_id, "train_loss") == list(range(1, 9))
    for key in ("score", "eval_loss", "cost_usd"):
        assert _steps(client, run_id, key) == [2, 4, 6, 8], key
    assert _steps(client, run_id, "system/cpu_utilization_percentage") == [2, 4, 6, 8]
    # the first attempt's point is the one kept for a step both reported
    score_4 = [m for m in client.get_metric_history(run_id, "score") if m.step == 4]
    assert len(score_4) == 1 and score_4[0].value == 0.4


def test_a_report_wholly_logged_before_writes_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "steps", artifact_root=tmp_path / "artifacts")
    tracker.start_sweep("s1", {}, {})
    run_id = tracker.start_trial("s1", "trial-001", "t1", {"learning_rate": 1e-3})
    logged: dict[str, int] = {}
    tracker.log_trial_result(run_id, _result(2), logged)
    tracker.log_trial_result(run_id, _result(2), logged)  # a retried attempt's replay of it
    assert _steps(MlflowClient(uri), run_id, "score") == [2]
    assert _steps(MlflowClient(uri), run_id, "train_loss") == [1, 2]
