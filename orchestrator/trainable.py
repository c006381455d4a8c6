"""The Ray Tune function trainable: glue between Tune, the budget ledger and ``workers.train``."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.costmodel import PRIOR_RELEASE_S
from orchestrator.spec import HYPERPARAMETERS
from workers.train import TrialConfig, run_trial


class LedgerBudget:
    """A trial's view of the sweep's ledger actor."""

    def __init__(self, ledger, trial_id: str) -> None:
        import ray

        self._ray, self.ledger, self.trial_id = ray, ledger, trial_id
        self.ceiling_usd = ray.get(ledger.ceiling.remote(trial_id))

    def request(self, total_usd: float) -> bool:
        if self._ray.get(self.ledger.request.remote(self.trial_id, total_usd)):
            self.ceiling_usd = total_usd
            return True
        return False


def train_lorasweep(config: dict, *, base: dict, ledger) -> None:
    """Run one trial of the sweep; ``base`` holds the TrialConfig fields the spec fixes."""
    import ray
    from ray import tune

    started_unix = time.time()
    trial_id = tune.get_context().get_trial_id()
    timings = ray.get(ledger.get_timings.remote())
    scheduled_unix = ray.get(ledger.started.remote(trial_id))
    hyper = {k: config[k] for k in HYPERPARAMETERS if k in config}
    hyper["loraplus_lr_ratio"] = hyper.get("loraplus_lr_ratio") or None
    if hyper.get("method") == "full":  # the search samples LoRA-scale lrs; full FT wants ~10x less
        hyper["learning_rate"] *= config.get("full_lr_scale", 1.0)
    memory = {k: config[k] for k in ("gradient_checkpointing", "micro_batch") if k in config}
    cfg = TrialConfig(
        **{
            **base,
            **hyper,
            **memory,
            # the admission's predictions for this config, until the trial measures its own
            "prior_step_s": config.get("predicted_step_s", base.get("prior_step_s", 5.0)),
            "prior_closing_s": timings.get(
                "closing_s", config.get("predicted_closing_s", base.get("prior_closing_s", 30.0))
            ),
            "release_s": timings.get("release_s", base.get("release_s", PRIOR_RELEASE_S)),
            "billing_start_unix": min(started_unix, scheduled_unix or started_unix),
        }
    )

    def report(metrics: dict, adapter_dir: Path) -> None:
        metrics = {**metrics, "trial_status": metrics.pop("status")}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(adapter_dir)))

    run_trial(cfg, report, LedgerBudget(ledger, trial_id))
