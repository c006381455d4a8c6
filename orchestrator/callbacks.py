"""The driver's Tune callback: ledger bookkeeping, MLflow child runs and live progress."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.tune import Callback

from orchestrator.prices import cost_usd
from orchestrator.spec import HYPERPARAMETERS


@dataclass
class _Live:
    run_id: str
    name: str
    started_unix: float
    last_result: dict = field(default_factory=dict)
    last_result_unix: float | None = None


def trial_params(config: dict) -> dict:
    """What a trial runs with, as logged: hyperparameters (full FT's effective lr) and any
    memory adjustment the admission made."""
    params = {k: config.get(k) for k in HYPERPARAMETERS}
    if params["method"] == "full":
        params["learning_rate"] *= config.get("full_lr_scale", 1.0)
        for k in HYPERPARAMETERS[2:]:  # adapter options mean nothing for full FT
            params.pop(k)
    for k in ("gradient_checkpointing", "micro_batch", "predicted_gib"):
        if k in config:
            params[k] = config[k]
    return params


def describe(p: dict) -> str:
    if p["method"] == "full":
        return f"full lr {p['learning_rate']:.2e}"
    extras = [k for k in ("use_rslora", "use_dora") if p.get(k)]
    if p.get("loraplus_lr_ratio"):
        extras.append(f"lora+ x{p['loraplus_lr_ratio']:g}")
    return (
        f"{p['method']} r{p['rank']} alpha {p['alpha']:g} {p['target_modules']} "
        f"lr {p['learning_rate']:.2e} {' '.join(extras)}"
    ).rstrip()


def _startup_s(result: dict) -> float | None:
    """Billed seconds before training began (actor start, imports, model load), measured at a
    trial's first report as what its steps, evals and saves do not explain."""
    if result.get("training_iteration") != 1:
        return None
    phases = result.get("phases_s", {})
    busy = sum(phases.get(k, 0.0) for k in ("step", "eval", "checkpoint", "report"))
    return result["billed_s"] - busy


class SweepCallback(Callback):
    """Keeps the ledger, MLflow and the console in step with Tune's view of the trials.

    A trial's final bill runs from when Tune started it to when it completed here: its last
    reported billed seconds plus the time since that report (an early-stopped trial keeps its
    resources until Tune releases them).
    """

    def __init__(
        self,
        *,
        sweep_id: str,
        tracker,
        ledger,
        price_usd_per_hour: float,
        cost_model,
        fixed_params: dict,
        console,
        base_score: float | None,
    ) -> None:
        self.sweep_id, self.tracker, self.ledger = sweep_id, tracker, ledger
        self.price_usd_per_hour = price_usd_per_hour
        self.cost_model = cost_model  # turns a measured step time into the method's FLOP/s
        self.fixed_params, self.console, self.base_score = fixed_params, console, base_score
        self.live: dict[str, _Live] = {}
        self.finished: list[dict] = []
        self._count = 0
        self._reports = 0

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state; the live MLflow client and the
        # console are not picklable and are re-supplied when a sweep is resumed.
        return {k: v for k, v in self.__dict__.items() if k not in ("tracker", "console")}

    # --- Tune hooks ---------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._count += 1
        now = time.time()
        ray.get(self.ledger.mark_started.remote(trial.trial_id, now))
        name = f"trial-{self._count:03d}"
        params = trial_params(trial.config)
        predicted = ray.get(self.ledger.predicted.remote(trial.trial_id))
        if predicted is not None:
            params["predicted_cost_usd"] = round(predicted, 6)
        run_id = self.tracker.start_trial(
            self.sweep_id, name, trial.trial_id, {**params, **self.fixed_params}
        )
        self.live[trial.trial_id] = _Live(run_id, name, now)
        self.console.print(f"[bold]{name}[/] started  {describe(params)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        live = self.live[trial.trial_id]
        live.last_result, live.last_result_unix = result, time.time()
        ray.get(self.ledger.update.remote(trial.trial_id, float(result["cost_usd"])))
        ray.get(
            self.ledger.calibrate.remote(
                **self.cost_model.calibration(trial.config, result.get("step_s")),
                closing_s=result.get("closing_s"),
                startup_s=_startup_s(result),
            )
        )
        self.tracker.log_trial_result(live.run_id, result)
        snap = ray.get(self.ledger.snapshot.remote())
        self._reports += 1
        self.tracker.log_sweep_metrics(
            {
                "budget_spent_usd": snap["spent_usd"],
                "budget_committed_usd": snap["cap_usd"] - snap["remaining_usd"],
            },
            self._reports,
        )
        self.console.print(
            f"  {live.name} step {result['step']:>4}  score {result['score']:.3f}  "
            f"eval_loss {result['eval_loss']:.4f}  ${result['cost_usd']:.5f}   "
            f"[dim]sweep spent ${snap['spent_usd']:.5f} of ${snap['cap_usd']:.5f}[/]"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = self.live[trial.trial_id].last_result
        status = last.get("trial_status", "running")
        self._finish(trial, {"running": "pruned"}.get(status, status))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "failed")

    # --- helpers ------------------------------------------------------------------------------
    def _finish(self, trial, status: str) -> None:
        live = self.live.pop(trial.trial_id, None)
        if live is None:
            return
        now = time.time()
        last = live.last_result
        tail_s = now - live.last_result_unix if live.last_result_unix else 0.0
        billed_s = max(last.get("billed_s", 0.0) + tail_s, now - live.started_unix)
        final_usd = cost_usd(self.price_usd_per_hour, billed_s)
        ray.get(self.ledger.settle.remote(trial.trial_id, final_usd))
        if "billed_s" in last:  # what was billed after the last report: later trials keep room
            ray.get(self.ledger.calibrate.remote(release_s=billed_s - last["billed_s"]))
        checkpoint = trial.checkpoint
        final = {"cost_usd": final_usd, "billed_s": billed_s, "step": last.get("step", 0)}
        for key in ("tokens", "base_model_reused"):
            if key in last:
                final[key] = last[key]
        # where the billed seconds went (goodput = phase_step_s / billed_s); idle = what the
        # worker's phases do not explain: actor start, imports, the wait to be released
        phases = last.get("phases_s", {})
        final.update({f"phase_{k}_s": v for k, v in phases.items()})
        if phases:
            final["phase_idle_s"] = max(billed_s - sum(phases.values()), 0.0)
        self.tracker.end_trial(
            live.run_id, status, dict(final), checkpoint.path if checkpoint is not None else None
        )
        self.finished.append(
            {"trial": live.name, "status": status, **final, "score": last.get("score")}
        )
        score = last.get("score")
        self.console.print(
            f"[bold]{live.name}[/] {status}  score "
            f"{'-' if score is None else f'{score:.3f}'}  ${final_usd:.5f} "
            f"({billed_s:.0f} s billed)"
        )
