"""The sweep driver: spec -> plan -> base-model eval -> Tune (TPE + ASHA + budget) -> summary.

Straight-line on purpose: every step below is one helper a reader can find in seconds.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from orchestrator import leaderboard
from orchestrator.preflight import Plan, make_plan
from orchestrator.spec import Dim, SearchSpace, SweepSpec
from orchestrator.tracking import Tracker, default_tracking_uri


@dataclass
class SweepResult:
    sweep_id: str
    tracking_uri: str
    budget_usd: float
    spent_usd: float
    base_score: float | None
    best: leaderboard.Row | None
    rows: list[leaderboard.Row] = field(default_factory=list)
    end_reason: str = ""
    wall_s: float = 0.0


def storage_urls(spec: SweepSpec) -> tuple[Path, str, str, str]:
    """(data_dir, MLflow tracking URI, Optuna storage URL, ledger URL), defaults embedded under
    data_dir."""
    data_dir = spec.storage.data_dir
    tracking = spec.storage.mlflow_tracking_uri or default_tracking_uri(data_dir)
    optuna_url = spec.storage.optuna_storage or f"sqlite:///{data_dir / 'optuna.db'}"
    service_db = spec.storage.service_db or f"sqlite:///{data_dir / 'lorasweep.db'}"
    return data_dir, tracking, optuna_url, service_db


def _ledger_timings(ledger) -> dict:
    """The ledger's measured timings (a module-level function: Tune pickles the searcher)."""
    import ray

    return ray.get(ledger.get_timings.remote())


def calibration_key(spec: SweepSpec) -> tuple[str, str]:
    """Measured speeds carry over between sweeps of the same model on the same trial resources."""
    res = spec.resources
    units = res.cpus_per_trial if res.accelerator == "cpu" else res.gpus_per_trial
    return spec.model.name_or_path, f"{res.accelerator}x{units}"


def _quiet_libraries() -> None:
    """Our own progress lines replace Tune's tables and Optuna's per-trial logs."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def _init_ray(spec: SweepSpec, address: str | None) -> None:
    import ray

    address = address or spec.storage.ray_address
    verbose = bool(os.environ.get("LORASWEEP_VERBOSE"))
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        ray.init(
            num_cpus=os.cpu_count(),
            num_gpus=_local_gpus(),
            include_dashboard=False,
            log_to_driver=verbose,
            configure_logging=verbose,
        )


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return 0


def _base_trial_config(spec: SweepSpec, plan: Plan) -> dict:
    t, res = spec.trial, spec.resources
    return {
        "model": plan.model_ref,
        "train_path": str(plan.train_path),
        "validation_path": str(plan.validation_path),
        "data_format": spec.data.format,
        "dtype": spec.model.dtype,
        "max_steps": t.max_steps,
        "eval_every": t.eval_every,
        "batch_size": t.batch_size,
        "max_seq_len": t.max_seq_len,
        "eval_examples": t.eval_examples,
        "max_new_tokens": t.max_new_tokens,
        "warmup_fraction": t.warmup_fraction,
        "seed": t.seed,
        "compile": t.compile,
        "price_usd_per_hour": plan.price_usd_per_hour,
        "device": "cuda" if res.gpus_per_trial else "cpu",
        "num_threads": res.cpus_per_trial,
        **{
            f"prior_{k}": v
            for k, v in plan.cost_model.timings(plan.extremes(spec.search_space)[1], {}).items()
            if k in ("step_s", "closing_s")
        },
    }


def _score_base(spec: SweepSpec, plan: Plan, ledger) -> dict | None:
    """Score the base model on the validation split as a Ray task holding a trial's resources;
    its cost is charged to the budget like a trial's."""
    import ray

    from workers.scoring import score_split

    if not ray.get(ledger.reserve.remote("baseline", plan.baseline_usd)):
        return None
    res, t = spec.resources, spec.trial
    task = ray.remote(score_split).options(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)
    start = time.time()
    out = ray.get(
        task.remote(
            plan.model_ref,
            plan.validation_path,
            data_format=spec.data.format,
            limit=t.eval_examples,
            max_new_tokens=t.max_new_tokens,
            max_seq_len=t.max_seq_len,
            batch_size=t.batch_size,
            dtype=spec.model.dtype,
            num_threads=res.cpus_per_trial,
            device="cuda" if res.gpus_per_trial else "cpu",
        )
    )
    billed_s = time.time() - start
    out["cost_usd"] = plan.price_usd_per_hour * billed_s / 3600
    ray.get(ledger.settle.remote("baseline", out["cost_usd"]))
    ray.get(ledger.calibrate.remote(closing_s=out["seconds"]))  # the first trial's eval prior
    return out


def _first_points(spec: SweepSpec, plan: Plan, space: SearchSpace) -> list[dict] | None:
    """The prior's config as the phase's first trial (``orchestrator.priors``), unless the spec
    asks for every trial to be sampled or nothing is searched."""
    from orchestrator.priors import first_config

    if space.first_trial != "prior":
        return None
    dims = plan.cost_model.dims
    point = first_config(space, dims.d_model, dims.model_type, spec.trial.max_steps)
    return [point] if point else None


def _make_tuner(
    spec: SweepSpec,
    plan: Plan,
    sweep_id: str,
    ledger,
    callback,
    optuna_url: str,
    space: SearchSpace,
    phase: str,
    num_samples: int,
):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.acquisition import CalibratedCost, CostAwareTPESampler
    from orchestrator.search import BudgetedSearcher, DefineByRun, Prediction
    from orchestrator.trainable import train_lorasweep

    metric, mode = spec.objective.metric, spec.objective.mode
    n_evals = len(spec.eval_steps)
    optuna_search = OptunaSearch(
        space=DefineByRun(space),
        metric=metric,
        mode=mode,
        points_to_evaluate=_first_points(spec, plan, space),
        sampler=CostAwareTPESampler(
            cost_of=CalibratedCost(
                functools.partial(
                    plan.cost_model.seconds, steps=spec.trial.max_steps, evals=n_evals
                ),
                functools.partial(_ledger_timings, ledger),
            ),
            fixed=space.fixed_values(),
            seed=spec.trial.seed,
            n_startup_trials=4,
        ),
        storage=optuna.storages.RDBStorage(optuna_url),
        study_name=f"{sweep_id}-{phase}",
    )

    def predict(hp: dict) -> Prediction:
        measured = _ledger_timings(ledger)
        t = plan.cost_model.timings(hp, measured)
        return Prediction(
            admission_usd=plan.admission_usd(measured, hp),
            trial_usd=plan.trial_usd(measured, hp, spec.trial.max_steps, n_evals),
            step_s=t["step_s"],
            closing_s=t["closing_s"],
        )

    cheapest, _ = plan.extremes(space)
    searcher = BudgetedSearcher(optuna_search, ledger, predict, cheapest, plan.memory_fit)
    if spec.early_stopping.enabled:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=metric,
            mode=mode,
            max_t=len(spec.eval_steps),
            grace_period=spec.first_rung_reports,
            reduction_factor=spec.early_stopping.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    res = spec.resources
    trainable = tune.with_resources(
        tune.with_parameters(train_lorasweep, base=_base_trial_config(spec, plan), ledger=ledger),
        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial},
    )
    storage_path = (spec.storage.data_dir / "ray").resolve()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=res.max_concurrent_trials,
            # the next trial runs in the same worker process: it reuses the loaded base model
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{sweep_id}-{phase}",
            storage_path=str(storage_path),
            verbose=0,
            callbacks=[callback],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    return tuner, searcher


def _summarize(
    spec,
    tracker: Tracker,
    tracking_uri: str,
    sweep_id: str,
    base: dict | None,
    snap: dict,
    reason: str,
    gate_reason: str = "",
    skipped: list[str] | None = None,
) -> tuple[list, leaderboard.Row | None]:
    from orchestrator.report import lora_vs_full, method_summary, render_markdown

    parent = leaderboard.find_sweep(tracking_uri, sweep_id)
    rows = leaderboard.trial_rows(tracking_uri, parent)
    best = leaderboard.best_row(rows)
    metrics = {
        "spent_usd": snap["spent_usd"],
        "budget_usd": spec.budget_usd,
        "unspent_usd": spec.budget_usd - snap["spent_usd"],
        "trials": len(rows),
        "best_score": best.score if best else None,
        "base_score": base["score"] if base else None,
        "base_eval_loss": base["eval_loss"] if base else None,
        "baseline_cost_usd": base["cost_usd"] if base else None,
    }
    summary = method_summary(rows)
    for method, m in summary.items():
        metrics[f"best_score_{method}"] = m["best_score"]
        metrics[f"best_cost_usd_{method}"] = m["best_cost_usd"]
    line = lora_vs_full(summary)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.md"
        report.write_text(render_markdown(summary, line, gate_reason, skipped or []))
        if line:
            tracker.client.set_tag(tracker.parent_id, "lorasweep.lora_vs_full", line)
        csv_path = leaderboard.write_csv(rows, Path(tmp) / "leaderboard.csv")
        png = leaderboard.plot_score_vs_cost(
            rows, Path(tmp) / "score_vs_cost.png", base["score"] if base else None
        )
        tracker.client.set_tag(tracker.parent_id, "lorasweep.end_reason", reason)
        if best:
            tracker.client.set_tag(tracker.parent_id, "lorasweep.best_run_id", best.run_id)
        tracker.end_sweep("completed", metrics, [csv_path, png, report])
    return rows, best


def _run_phase(spec, plan, sweep_id, ledger, callback, optuna_url, space, phase, num_samples):
    tuner, searcher = _make_tuner(
        spec, plan, sweep_id, ledger, callback, optuna_url, space, phase, num_samples
    )
    tuner.fit()
    return searcher


def _gate(spec: SweepSpec, plan: Plan, tracking_uri: str, sweep_id: str, ledger):
    """The staged strategy's decision after the LoRA sweep: run full FT or not, and why."""
    import ray

    from orchestrator.report import ADAPTER_METHODS, full_ft_gate

    rows = leaderboard.trial_rows(tracking_uri, leaderboard.find_sweep(tracking_uri, sweep_id))
    scores = [r.score for r in rows if r.method in ADAPTER_METHODS and r.score is not None]
    snap = ray.get(ledger.snapshot.remote())
    measured = _ledger_timings(ledger)
    return full_ft_gate(
        max_runs=spec.full.max_runs,
        gate=spec.full.gate,
        target_score=spec.full.target_score,
        best_lora_score=max(scores) if scores else None,
        predicted_usd=plan.admission_usd(measured, {"method": "full"}),
        remaining_usd=snap["remaining_usd"],
    )


def run_sweep(spec: SweepSpec, console, address: str | None = None) -> SweepResult:
    """Run a whole sweep and return its leaderboard; raises before any spend on bad input."""
    import ray

    from orchestrator.budget import Ledger
    from orchestrator.callbacks import SweepCallback

    t0 = time.time()
    _quiet_libraries()
    console.print("[bold]checking[/] spec, data, model and prices ...")
    plan = make_plan(spec)
    data_dir, tracking_uri, optuna_url, service_db = storage_urls(spec)
    data_dir.mkdir(parents=True, exist_ok=True)
    sweep_id = f"{spec.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    console.print(
        f"[bold]sweep[/] {sweep_id}: budget ${spec.budget_usd:g}, trial resources "
        f"${plan.price_usd_per_hour:.4f}/h, first rung predicted "
        f"${plan.admission_usd({}, plan.extremes(spec.search_space)[0]):.5f}"
    )
    _init_ray(spec, address)
    ledger = (
        ray.remote(Ledger)
        .options(num_cpus=0)
        .remote(
            spec.budget_usd,
            sweep_id=sweep_id,
            store_url=service_db,
            name=spec.name,
            calibration_key=calibration_key(spec),
        )
    )
    tracker = Tracker(tracking_uri, spec.name, artifact_root=data_dir / "artifacts")
    tracker.start_sweep(
        sweep_id,
        spec.model_dump(mode="json"),
        {
            "budget_usd": spec.budget_usd,
            "model": spec.model.name_or_path,
            "accelerator": spec.resources.accelerator,
            "price_usd_per_hour": plan.price_usd_per_hour,
            "max_trials": spec.max_trials,
            "objective": spec.objective.metric,
        },
    )
    console.print("[bold]scoring[/] the base model on the validation split ...")
    base = _score_base(spec, plan, ledger)
    if base:
        console.print(
            f"  base model score {base['score']:.3f}  eval_loss {base['eval_loss']:.4f}  "
            f"${base['cost_usd']:.5f}"
        )
    fixed = {
        k: v
        for k, v in _base_trial_config(spec, plan).items()
        if k
        in (
            "max_steps",
            "eval_every",
            "batch_size",
            "max_seq_len",
            "seed",
            "dtype",
            "price_usd_per_hour",
        )
    }
    callback = SweepCallback(
        sweep_id=sweep_id,
        tracker=tracker,
        ledger=ledger,
        price_usd_per_hour=plan.price_usd_per_hour,
        cost_model=plan.cost_model,
        fixed_params={**fixed, "base_model": spec.model.name_or_path},
        console=console,
        base_score=base["score"] if base else None,
    )
    try:
        run_phase = functools.partial(
            _run_phase, spec, plan, sweep_id, ledger, callback, optuna_url
        )
        searcher = run_phase(spec.search_space, "lora", spec.max_trials)
        reason = searcher.exhausted_reason or f"max_trials ({spec.max_trials}) reached"
        skipped = list(searcher.skipped)
        run_full, gate_reason = _gate(spec, plan, tracking_uri, sweep_id, ledger)
        console.print(
            f"[bold]full fine-tuning[/] {'runs' if run_full else 'skipped'}: {gate_reason}"
        )
        if run_full:
            full_space = spec.search_space.model_copy(
                update={
                    "method": Dim(value="full"),
                    "learning_rate": spec.full.learning_rate,
                    "full_lr_scale": 1.0,
                }
            )
            full_searcher = run_phase(full_space, "full", spec.full.max_runs)
            reason = full_searcher.exhausted_reason or reason
            skipped += full_searcher.skipped
    except BaseException:
        tracker.end_sweep("failed", ray.get(ledger.snapshot.remote()), [])
        raise
    for reason_skipped in skipped:
        console.print(f"[yellow]not launched[/] {reason_skipped}")  # "budget: ..." or "memory: ..."
    snap = ray.get(ledger.snapshot.remote())
    rows, best = _summarize(
        spec, tracker, tracking_uri, sweep_id, base, snap, reason, gate_reason, skipped
    )
    return SweepResult(
        sweep_id,
        tracking_uri,
        spec.budget_usd,
        snap["spent_usd"],
        base["score"] if base else None,
        best,
        rows,
        reason,
        time.time() - t0,
    )
