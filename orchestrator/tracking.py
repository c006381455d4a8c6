"""MLflow logging, owned by the driver: one parent run per sweep, one child run per trial.

Only the driver process writes to MLflow (workers report through Tune, system metrics too), so an
embedded sqlite backend sees a single writer, and metrics are logged in batches, once per eval
report. What a person reads in the UI (run descriptions, costs in cents) is ``run_notes``.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from orchestrator import run_notes
from orchestrator.run_notes import NOTE_TAG, with_cents
from orchestrator.secrets import redact

KIND_TAG, SWEEP_TAG, STATUS_TAG = "lorasweep.kind", "lorasweep.sweep_id", "lorasweep.status"
PARENT_TAG = "mlflow.parentRunId"
TENANT_TAG = "lorasweep.tenant"
PACKED_TAG = "lorasweep.packed"  # "true" on a trial that ran as a slot of a pack (pack_sweep.py)
# MLflow 3's experiment type: "custom_model_development" is "Machine learning" in the UI's own
# kind selector (the other it offers is "genai_development"), so the UI lists it as a training
# experiment and MLflow versions that route by the tag open its runs table, with child runs nested
# under their parent. ("finetuning", a Databricks label, routes the same but is no choice there.)
# The UI of MLflow 3.17 routes by its sidebar's GenAI / Model training switch instead (default
# GenAI): the link that opens the runs table either way is ``runs_url``.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# files of a trial's checkpoint that only a resumed attempt needs (workers.train.STATE_FILE):
# not part of the adapter logged to MLflow
RESUME_ONLY = ("trainer_state.pt",)
_TRIAL_METRICS = (
    "eval_loss",
    "score",
    "cost_usd",
    "billed_s",
    "tokens",
    "eval_tokens_generated",
    "eval_decode_steps",
)


def run_status(status: str) -> str:
    """MLflow's run status for a sweep's or trial's own: failed runs FAILED, interrupted and
    cancelled ones KILLED, the rest FINISHED."""
    return {"failed": "FAILED", "interrupted": "KILLED", "cancelled": "KILLED"}.get(
        status, "FINISHED"
    )


def default_tracking_uri(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'mlflow.db'}"


def runs_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs (the sweep's parent run with its trials
    nested), on the UI's "Model training" side: without ``workflowType`` MLflow 3.17 opens an
    experiment on its GenAI overview (traces, latency)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class Tracker:
    """Thin wrapper over ``MlflowClient`` with explicit run ids (no global active run)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        exp = self.client.get_experiment_by_name(experiment)
        # the service names each tenant's experiments TENANT/NAME: tagged with the tenant, so the
        # MLflow UI (and a search) can keep tenants apart
        tags = {TENANT_TAG: experiment.split("/", 1)[0]} if "/" in experiment else {}
        if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:  # an older store's gets it too
            tags[EXPERIMENT_KIND_TAG] = EXPERIMENT_KIND  # a kind someone chose is kept
        if exp is None:
            location = None
            if artifact_root is not None and not tracking_uri.startswith(("http:", "https:")):
                location = (Path(artifact_root).resolve() / experiment).as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags=tags
            )
        else:
            self.experiment_id = exp.experiment_id
            for key, value in tags.items():
                if exp.tags.get(key) != value:
                    self.client.set_experiment_tag(self.experiment_id, key, value)
        self.parent_id: str | None = None
        self._running: tuple[str, dict] | None = None  # (sweep id, params) while it runs

    # --- sweep (parent run) ---------------------------------------------------------------
    def start_sweep(self, sweep_id: str, spec: dict, params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=sweep_id,
            tags={KIND_TAG: "sweep", SWEEP_TAG: sweep_id, STATUS_TAG: "running"},
        )
        self.parent_id = run.info.run_id
        self.client.log_text(
            self.parent_id, redact(yaml.safe_dump(spec, sort_keys=False)), "spec.yaml"
        )
        self._log_params(self.parent_id, params)
        self._running = (sweep_id, {k: str(v) for k, v in params.items()})
        self._note_sweep(sweep_id, "running", params, {"spent_usd": 0.0}, {})
        return self.parent_id

    def attach_sweep(self, sweep_id: str) -> str:
        """Continue the parent run of an earlier part of ``sweep_id`` (``lorasweep resume``)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`{KIND_TAG}` = 'sweep'",
            max_results=1,
        )
        if not runs:
            from orchestrator.errors import LorasweepError

            raise LorasweepError(
                f"SWEEP: no MLflow parent run of {sweep_id} at {self.tracking_uri}"
            )
        self.parent_id = runs[0].info.run_id
        self.client.update_run(self.parent_id, status="RUNNING")
        self.client.set_tag(self.parent_id, STATUS_TAG, "running")
        data = runs[0].data
        self._running = (sweep_id, dict(data.params))
        self._note_sweep(sweep_id, "running", data.params, {"spent_usd": None}, {})
        return self.parent_id

    def sweep_metrics(self) -> dict[str, float]:
        return dict(self.client.get_run(self.parent_id).data.metrics)

    def sweep_tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.parent_id).data.tags)

    def close_open_trials(self, status: str, costs: dict[str, float]) -> list[str]:
        """End the child runs still RUNNING (a crashed part's), each with its ledger cost
        (``costs`` by trial id); returns the run ids closed."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{PARENT_TAG}` = '{self.parent_id}' and attributes.status = 'RUNNING'",
            max_results=5000,
        )
        for run in runs:
            usd = costs.get(run.data.tags.get("lorasweep.trial_id", ""))
            if usd is not None:
                self._log_metrics(run.info.run_id, {"cost_usd": usd}, 0)
            note = run_notes.trial_note(
                run.info.run_name,
                status,
                run_notes.config_summary(run.data.params),
                cost_usd=usd,
            )
            self.client.set_tag(run.info.run_id, NOTE_TAG, note)
            self.client.set_tag(run.info.run_id, STATUS_TAG, status)
            self.client.set_terminated(run.info.run_id, run_status(status))
        return [r.info.run_id for r in runs]

    def count_trials(self) -> int:
        return len(self.trial_runs())

    def trial_runs(self) -> list:
        """The sweep's child runs (one per trial)."""
        return self.client.search_runs(
            [self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_id}'", max_results=5000
        )

    def log_sweep_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_metrics(self.parent_id, metrics, step)
        if self._running and "budget_spent_usd" in metrics:  # the description's spend, live
            sweep_id, params = self._running
            self._note_sweep(
                sweep_id, "running", params, {"spent_usd": metrics["budget_spent_usd"]}, {}
            )

    def end_sweep(self, status: str, metrics: dict[str, float], artifacts: list[Path]) -> None:
        self._log_metrics(self.parent_id, metrics, 0)
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path))
        self._running = None
        parent = self.client.get_run(self.parent_id)
        sweep_id = parent.data.tags.get(SWEEP_TAG, parent.info.run_name)
        self._note_sweep(sweep_id, status, parent.data.params, metrics, parent.data.tags)
        self.client.set_tag(self.parent_id, STATUS_TAG, status)
        self.client.set_terminated(self.parent_id, run_status(status))

    # --- trials (child runs) ----------------------------------------------------------------
    def start_trial(
        self,
        sweep_id: str,
        trial_name: str,
        trial_id: str,
        params: dict,
        metrics: dict | None = None,
    ) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial_name,
            tags={
                KIND_TAG: "trial",
                SWEEP_TAG: sweep_id,
                PARENT_TAG: self.parent_id,
                "lorasweep.trial_id": trial_id,
                STATUS_TAG: "running",
                **({PACKED_TAG: "true"} if int(params.get("pack_slots") or 1) > 1 else {}),
            },
        )
        self._log_params(run.info.run_id, params)
        if metrics:  # known at its start (the admission's predictions): logged once, at step 0
            self._log_metrics(run.info.run_id, metrics, 0)
        summary = run_notes.config_summary(params)
        predicted = params.get("predicted_cost_usd")
        note = run_notes.trial_note(trial_name, "running", summary, predicted_usd=predicted)
        self.client.set_tag(run.info.run_id, NOTE_TAG, note)
        return run.info.run_id

    def find_trial(self, sweep_id: str, trial_id: str) -> tuple[str, str] | None:
        """(run id, run name) of the child run already made for ``trial_id`` (a retried create
        whose reply was lost, or a resumed sweep), if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`lorasweep.trial_id` = '{trial_id}'",
            max_results=1,
        )
        return (runs[0].info.run_id, runs[0].info.run_name) if runs else None

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """Per metric key, the last step a run holds."""
        run = self.client.get_run(run_id)
        return {
            key: max(m.step for m in self.client.get_metric_history(run_id, key))
            for key in run.data.metrics
        }

    def log_trial_result(
        self, run_id: str, result: dict, logged_steps: dict[str, int] | None = None
    ) -> None:
        """One eval report: train loss of every step since the last one, the eval metrics, and
        the system metrics its worker sampled since its last report (``system_metrics``).

        ``logged_steps`` (per key, the last step the run holds; updated here) drops what the run
        already has: a trial that went on from its checkpoint after its worker or the driver
        was lost reports again the steps its lost attempt reported after that checkpoint, and a
        run keeps one point per step."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [
            Metric("train_loss", float(v), now_ms, int(s))
            for s, v in result.get("train_loss_steps", [])
        ]
        step = int(result["step"])
        evals = with_cents({k: result[k] for k in _TRIAL_METRICS if k in result})
        metrics += [Metric(k, float(v), now_ms, step) for k, v in evals.items()]
        metrics += [
            Metric(str(k), float(v), int(ts_ms), int(n))
            for k, v, ts_ms, n in result.get("system_metrics", [])
        ]
        if logged_steps is not None:
            metrics = [m for m in metrics if m.step > logged_steps.get(m.key, -1)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if logged_steps is not None:
            for m in metrics:
                logged_steps[m.key] = max(m.step, logged_steps.get(m.key, -1))

    def end_trial(
        self,
        run_id: str,
        status: str,
        final: dict,
        adapter_dir: str | None,
        error: str | None = None,
    ) -> None:
        self._log_metrics(run_id, final, int(final.pop("step", 0)))
        if adapter_dir and Path(adapter_dir).is_dir():  # the adapter, not the resume state
            for path in sorted(Path(adapter_dir).iterdir()):
                if path.name not in RESUME_ONLY:
                    self.client.log_artifact(run_id, str(path), "adapter")
        if error:
            self.client.set_tag(run_id, "lorasweep.error", redact(error)[:5000])
        run = self.client.get_run(run_id)
        self.client.set_tag(run_id, NOTE_TAG, _ended_trial_note(run, status, final, error))
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.set_terminated(run_id, run_status(status))

    # --- helpers --------------------------------------------------------------------------
    def _note_sweep(self, sweep_id: str, status: str, params, metrics: dict, tags) -> None:
        """Write the parent run's description from its params, these metrics and its tags."""
        metric = params.get("objective", "score")
        objective = f"{metric} ({params.get('objective_mode', 'max')})"
        best = None
        if tags.get("lorasweep.best_run_id"):
            best = _best_text(self.client.get_run(tags["lorasweep.best_run_id"]), metric)
        budget = metrics.get("budget_usd", metrics.get("cap_usd", params.get("budget_usd")))
        note = run_notes.sweep_note(
            sweep_id,
            status,
            budget_usd=None if budget is None else float(budget),
            spent_usd=metrics.get("spent_usd"),
            trials=None if metrics.get("trials") is None else int(metrics["trials"]),
            best=best,
            end_reason=tags.get("lorasweep.end_reason", ""),
            model=str(params.get("model", "")),
            objective=objective,
        )
        self.client.set_tag(self.parent_id, NOTE_TAG, redact(note))

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(
            run_id,
            params=[Param(k, redact(str(v))[:6000]) for k, v in with_cents(params).items()],
        )

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now_ms, step)
                for k, v in with_cents(metrics).items()
                if v is not None
            ],
        )


def _best_text(run, metric: str) -> tuple[str, str]:
    """A sweep's best trial: ``trial-003, score 0.812`` and that with its config and cost."""
    m = run.data.metrics
    value = m.get(f"best_{metric}", m.get(metric))
    short = f"{run.info.run_name}, {metric} {'-' if value is None else f'{value:.4g}'}"
    config = run_notes.config_summary(run.data.params)
    return short, f"{short} ({config}), {run_notes.money(m.get('cost_usd'))}"


def _ended_trial_note(run, status: str, final: dict, error: str | None) -> str:
    """A trial's description once it ended: its config, status, cost and kept eval."""
    score = ""
    if "best_step" in final:
        parts = [
            f"{k} {final[f'best_{k}']:.4g}" for k in ("score", "eval_loss") if f"best_{k}" in final
        ]
        score = f"Kept step {int(final['best_step'])}: {', '.join(parts)}."
    return run_notes.trial_note(
        run.info.run_name,
        status,
        run_notes.config_summary(run.data.params),
        cost_usd=final.get("cost_usd"),
        billed_s=final.get("billed_s"),
        score=score,
        error=redact(error) if error else "",
    )
