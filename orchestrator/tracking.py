"""MLflow logging, owned by the driver: one parent run per sweep, one child run per trial.

Only the driver process writes to MLflow (workers report through Tune), so an embedded sqlite
backend sees a single writer, and metrics are logged in batches, once per eval report.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from orchestrator.secrets import redact

KIND_TAG, SWEEP_TAG, STATUS_TAG = "lorasweep.kind", "lorasweep.sweep_id", "lorasweep.status"
PARENT_TAG = "mlflow.parentRunId"
TENANT_TAG = "lorasweep.tenant"
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
    """MLflow's run status for a sweep's or trial's own: failed runs FAILED, interrupted ones
    KILLED, the rest FINISHED."""
    return {"failed": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED")


def default_tracking_uri(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'mlflow.db'}"


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

    def end_sweep(self, status: str, metrics: dict[str, float], artifacts: list[Path]) -> None:
        self._log_metrics(self.parent_id, metrics, 0)
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path))
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
            },
        )
        self._log_params(run.info.run_id, params)
        if metrics:  # known at its start (the admission's predictions): logged once, at step 0
            self._log_metrics(run.info.run_id, metrics, 0)
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

    def log_trial_result(self, run_id: str, result: dict) -> None:
        """One eval report: train loss of every step since the last one, and the eval metrics."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [
            Metric("train_loss", float(v), now_ms, int(s))
            for s, v in result.get("train_loss_steps", [])
        ]
        step = int(result["step"])
        metrics += [
            Metric(k, float(result[k]), now_ms, step) for k in _TRIAL_METRICS if k in result
        ]
        self.client.log_batch(run_id, metrics=metrics)

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
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.set_terminated(run_id, run_status(status))

    # --- helpers --------------------------------------------------------------------------
    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(
            run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        )

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now_ms, step) for k, v in metrics.items() if v is not None
            ],
        )
