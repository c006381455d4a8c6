"""The sweep driver: spec -> plan -> base-model eval -> Tune (TPE + ASHA + budget) -> summary.

Straight-line on purpose: every step below is one helper a reader can find in seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from orchestrator import leaderboard, pack_sweep, remote
from orchestrator.errors import LorasweepError
from orchestrator.preflight import Plan, make_plan
from orchestrator.secrets import redact
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
    interrupted: bool = False


def storage_urls(spec: SweepSpec) -> tuple[Path, str, str, str]:
    """(data_dir, MLflow tracking URI, Optuna storage URL, ledger URL), defaults embedded under
    data_dir."""
    data_dir = spec.storage.data_dir
    tracking = spec.storage.mlflow_tracking_uri or default_tracking_uri(data_dir)
    optuna_url = spec.storage.optuna_storage or f"sqlite:///{data_dir / 'optuna.db'}"
    service_db = spec.storage.service_db or f"sqlite:///{data_dir / 'lorasweep.db'}"
    return data_dir, tracking, optuna_url, service_db


class SweepAborted(LorasweepError):
    """The sweep stopped before its end on a persistent error; every account was settled."""


def _ledger_timings(ledger) -> dict:
    """The ledger's measured timings (a module-level function: Tune pickles the searcher)."""
    return remote.call(ledger.get_timings)


class Predictor:
    """A config's predicted cost with the sweep's measured timings. A class holding only the plan
    and the ledger's handle (Tune pickles the searcher that holds it: a closure over the spec
    would carry its storage URLs, passwords included, into the experiment folder)."""

    def __init__(self, plan: Plan, ledger, max_steps: int, n_evals: int) -> None:
        self.plan, self.ledger, self.max_steps, self.n_evals = plan, ledger, max_steps, n_evals

    def __call__(self, hp: dict):
        from orchestrator.search import Prediction

        measured = _ledger_timings(self.ledger)
        t = self.plan.cost_model.timings(hp, measured)
        return Prediction(
            admission_usd=self.plan.admission_usd(measured, hp),
            trial_usd=self.plan.trial_usd(measured, hp, self.max_steps, self.n_evals),
            step_s=t["step_s"],
            closing_s=t["closing_s"],
            startup_s=t["startup_s"],
        )


def _quiet_libraries() -> None:
    """Our own progress lines replace Tune's tables and Optuna's per-trial logs."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stops the sweep (``_interrupts``)
    # Tune saves its experiment (trials, searcher) this often: what ``lorasweep resume`` restores
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # a trial refused before its first step ends without a report (so without the metric):
    # ASHA skips it and the searcher records it PRUNED, instead of Tune failing the sweep
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    logging.getLogger("optuna").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def _init_ray(spec: SweepSpec, address: str | None) -> None:
    import ray

    from orchestrator.storage_check import cluster_address

    # a cluster named by the spec, `serve --ray-address` or a Ray Job's RAY_ADDRESS; else a
    # local Ray of its own ("local": not a `ray start` cluster of this machine, nor a dead one's
    # address left in Ray's temp folder, which ray.init() would otherwise try to join)
    address = address or cluster_address(spec)
    verbose = bool(os.environ.get("LORASWEEP_VERBOSE"))
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            num_gpus=_local_gpus(),
            include_dashboard=False,
            log_to_driver=verbose,
            configure_logging=verbose,
            # no idle pool: each worker starts for the lease it serves, so a trial's bill starts
            # with its worker process (orchestrator/trainable.py) and nothing idles on a GPU
            _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
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
        "truncation": spec.data.truncation,
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
        # fault injection (tests, bench/fault_injection.py); unset for every real sweep
        "fault": os.environ.get("LORASWEEP_FAULT") or None,
        **{
            f"prior_{k}": v
            for k, v in plan.cost_model.timings(plan.extremes(spec.search_space)[1], {}).items()
            if k in ("step_s", "closing_s")
        },
    }


def _score_base(spec: SweepSpec, plan: Plan, ledger) -> dict | None:
    """Score the base model on the validation split as a Ray task holding a trial's resources;
    its cost is charged to the budget like a trial's. It runs under a ceiling (twice its
    prediction where the cap allows): no retries, and past its ceiling plus the watchdog's margin
    and grace the task is cancelled and the sweep goes on without a base score."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    from orchestrator.prices import cost_usd
    from orchestrator.watchdog import GRACE_S, KILL_LATENCY_S, MARGIN_S
    from workers.scoring import score_split

    ceiling_usd = 2 * plan.baseline_usd
    if not remote.call(ledger.reserve, "baseline", ceiling_usd):
        ceiling_usd = plan.baseline_usd
        if not remote.call(ledger.reserve, "baseline", ceiling_usd):
            return None
    res, t = spec.resources, spec.trial
    # max_calls=1: its worker (and GPU memory) goes (Ray takes max_calls in ray.remote only:
    # ``.options(max_calls=...)`` raises ValueError)
    task = ray.remote(max_calls=1)(score_split).options(
        num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial, max_retries=0
    )
    limit_s = ceiling_usd / plan.price_usd_per_hour * 3600 + MARGIN_S + GRACE_S
    start = time.monotonic()
    ref = task.remote(
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
    stopped = None
    try:
        out = ray.get(ref, timeout=limit_s)
    except GetTimeoutError:
        stopped = "passed its ceiling and was stopped"
    except RayError as exc:  # an OOM, bad data: the sweep can go on without the base score
        stopped = f"failed ({type(exc).__name__})"
    if stopped:
        ray.cancel(ref, force=True)
        ray.wait([ref], timeout=KILL_LATENCY_S)  # bill until the process is gone
    # billed on the task's own clock when it answered (its process held the resources for that
    # long: the OS agrees), on the driver's from the submit when it did not
    held_s = float(out["held_s"]) if not stopped else time.monotonic() - start
    cost = cost_usd(plan.price_usd_per_hour, held_s)
    remote.call(ledger.settle, "baseline", cost)
    if stopped:
        return {"stopped": stopped, "cost_usd": cost}
    out["cost_usd"] = cost
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


def _unfinish_search(experiment: str) -> None:
    """A phase stopped early (Ctrl-C, an error) saved its search as finished (Tune's stop-all
    marks it so) and its concurrency limiter full: clear both in the saved state, or the resumed
    phase proposes nothing. Counting trials against ``num_samples`` is kept. (Tune's
    ``search_gen_state`` file, in a folder or an object store: pyarrow's filesystems.)"""
    import pyarrow.fs
    import ray.cloudpickle as cloudpickle

    fs, root = pyarrow.fs.FileSystem.from_uri(experiment)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        name = info.path.rsplit("/", 1)[-1]
        if not (name.startswith("search_gen_state-") and name.endswith(".json")):
            continue
        with fs.open_input_stream(info.path) as f:
            state = cloudpickle.loads(f.read())
        state["finished"] = False
        # Tune's concurrency limiter still counts the trials the stop ended (it was never told
        # of their end): a full count would let the resumed phase start nothing
        limiter = state.get("name:ConcurrencyLimiter")
        if isinstance(limiter, dict) and "live_trials" in limiter:
            limiter["live_trials"] = set()
        with fs.open_output_stream(info.path) as f:
            f.write(cloudpickle.dumps(state))


def _earlier_trials(storage, study_name: str) -> int:
    """How many trials the study already holds (0 for a new one)."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    trials = study.get_trials(deepcopy=False)
    return len(trials)


def _phase_trials(tracker, phase: str) -> int:
    """How many trials of ``phase`` (``lora`` or ``full``) the sweep's MLflow runs hold."""
    from orchestrator.callbacks import retried

    runs = retried(tracker.trial_runs)
    return sum(1 for r in runs if (r.data.params.get("method") == "full") == (phase == "full"))


def _fail_orphans(searcher) -> int:
    """Once a phase's Tune trials have all ended: mark FAIL the study's trials still RUNNING
    (a dead driver's, whose Tune state was not saved; no one will finish them). Returns how
    many."""
    from optuna.trial import TrialState

    study = getattr(searcher.searcher, "_ot_study", None)
    if study is None:
        return 0
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in orphans:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(orphans)


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
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.acquisition import CalibratedCost, CostAwareTPESampler
    from orchestrator.callbacks import SweepStopper
    from orchestrator.callbacks import interrupted as sweep_interrupted
    from orchestrator.memory_lessons import MemoryLessons
    from orchestrator.optuna_storage import SecretlessRDBStorage
    from orchestrator.schedulers import SweepASHA, SweepFIFO
    from orchestrator.search import BudgetedSearcher, DefineByRun
    from orchestrator.storage_check import tune_storage
    from orchestrator.trainable import train_lorasweep

    metric, mode = spec.objective.metric, spec.objective.mode
    n_evals = len(spec.eval_steps)
    storage = SecretlessRDBStorage(optuna_url)
    earlier = _earlier_trials(storage, f"{sweep_id}-{phase}")  # a resumed phase's study
    optuna_search = OptunaSearch(
        space=DefineByRun(space),
        metric=metric,
        mode=mode,
        points_to_evaluate=None if earlier else _first_points(spec, plan, space),
        sampler=CostAwareTPESampler(
            cost_of=CalibratedCost(
                functools.partial(
                    plan.cost_model.seconds, steps=spec.trial.max_steps, evals=n_evals
                ),
                functools.partial(_ledger_timings, ledger),
            ),
            fixed=space.fixed_values(),
            seed=spec.trial.seed + earlier,  # a resumed study does not draw the same configs
            n_startup_trials=4,
        ),
        storage=storage,
        study_name=f"{sweep_id}-{phase}",
    )

    cheapest, _ = plan.extremes(space)
    predict = Predictor(plan, ledger, spec.trial.max_steps, n_evals)
    searcher = BudgetedSearcher(
        optuna_search,
        ledger,
        predict,
        cheapest,
        pack_sweep.memory_fit(spec, plan, phase),  # a packed phase's configs carry its K
        stopping=functools.partial(sweep_interrupted, sweep_id),
        lessons=MemoryLessons(spec.trial.batch_size),
    )
    if spec.early_stopping.enabled:
        scheduler = SweepASHA(
            sweep_id,
            time_attr="training_iteration",
            metric=metric,
            mode=mode,
            max_t=len(spec.eval_steps),
            grace_period=spec.first_rung_reports,
            reduction_factor=spec.early_stopping.reduction_factor,
        )
    else:
        scheduler = SweepFIFO(sweep_id)
    # resources.pack_slots > 1: the phase's trials are slots of one pack host (pack_sweep.py)
    host = pack_sweep.start_host(spec, plan, sweep_id, phase)
    trainable = tune.with_resources(
        tune.with_parameters(
            train_lorasweep,
            base=_base_trial_config(spec, plan),
            ledger=ledger,
            **({} if host is None else {"pack": host}),
        ),
        pack_sweep.trial_resources(spec, phase),
    )
    # storage.ray_storage (every node's, on a cluster: storage_check.py) or <data_dir>/ray
    storage_path = tune_storage(spec)
    experiment = f"{storage_path.rstrip('/')}/{sweep_id}-{phase}"
    if tune.Tuner.can_restore(experiment):  # ``lorasweep resume``: this phase had begun
        _unfinish_search(experiment)
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=False
        )
        # Tune restores its pickled searcher, callbacks and stopper; this driver's own replace
        # them (their state comes back through restore_from_dir: the Optuna study, its trials)
        internal = tuner._local_tuner
        internal._tune_config.search_alg = searcher
        internal._run_config.callbacks = [callback]
        internal._run_config.stop = SweepStopper(sweep_id, callback.control)
        return tuner, searcher
    if earlier:  # resumed, but Tune saved no state: count the trials the phase already started
        num_samples -= _phase_trials(callback.tracker, phase)
        if num_samples <= 0:
            return None, searcher
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=pack_sweep.concurrency(spec, phase),
            # the next trial runs in the same worker process: it reuses the loaded base model
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{sweep_id}-{phase}",
            storage_path=storage_path,
            verbose=0,
            callbacks=[callback],
            stop=SweepStopper(sweep_id, callback.control),
            # each trial keeps its best checkpoint by the objective (the adapter promote
            # registers) and, while it runs, its latest (what a retry continues from)
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            # a lost worker's trial is retried from its last checkpoint (workers/train.py)
            failure_config=tune.FailureConfig(max_failures=spec.trial.max_retries),
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
        report.write_text(
            render_markdown(
                summary,
                line,
                gate_reason,
                skipped or [],
                baseline_usd=base["cost_usd"] if base else None,
                spent_usd=snap["spent_usd"],
            )
        )
        if line:
            tracker.client.set_tag(tracker.parent_id, "lorasweep.lora_vs_full", line)
        csv_path = leaderboard.write_csv(rows, Path(tmp) / "leaderboard.csv")
        png = leaderboard.plot_score_vs_cost(
            rows, Path(tmp) / "score_vs_cost.png", base["score"] if base else None
        )
        tracker.client.set_tag(tracker.parent_id, "lorasweep.end_reason", reason)
        if best:
            tracker.client.set_tag(tracker.parent_id, "lorasweep.best_run_id", best.run_id)
        status = "interrupted" if reason == "interrupted" else "completed"
        tracker.end_sweep(status, metrics, [csv_path, png, report])
    return rows, best


def _run_phase(spec, plan, sweep_id, ledger, callback, optuna_url, space, phase, num_samples):
    tuner, searcher = _make_tuner(
        spec, plan, sweep_id, ledger, callback, optuna_url, space, phase, num_samples
    )
    if tuner is None:  # resumed with no Tune state, and every trial of the phase already ran
        return searcher
    before, since_unix = set(callback.started_ids), time.time()
    try:
        tuner.fit()
    finally:  # trials Tune stopped without a word (an interrupt, an error) are closed here
        control = callback.control
        status = "interrupted" if control.interrupted else "failed" if control.fatal else "stopped"
        for trial_id in callback.finish_open(status):
            try:
                searcher.on_trial_complete(trial_id, result=None)  # PRUNED in Optuna
            except Exception:  # noqa: BLE001 - the study is told what it can be told
                pass
        if pack_sweep.packed(spec, phase):  # the trials' actors hold no GPU: the pack's bills
            pack_sweep.finish_host(spec, plan, ledger, sweep_id, phase)
        else:
            _charge_idle_tails(ledger, plan, phase, callback.started_ids - before, since_unix)
    if not (callback.control.fatal or callback.control.interrupted):
        _fail_orphans(searcher)
    return searcher


def _charge_idle_tails(
    ledger, plan: Plan, phase: str, trial_ids: set[str], since_unix: float
) -> None:
    """Bill what the phase's trial actors held outside every trial's bill: Ray's records of
    them where they can be read (an actor Tune started and gave no trial, a used one's time from
    its last trial's last word until Tune stopped it; ``actor_spans.py``), else the ledger's
    bounded tails (``Ledger.idle_tails``). Each actor on a key of its own: billed once. Only
    actors born since ``since_unix`` (the phase's start) are this phase's."""
    import uuid

    from orchestrator import actor_spans
    from orchestrator.prices import cost_usd

    try:
        spans = actor_spans.trial_actor_spans(born_after_unix=since_unix)
        if spans is not None:
            workers = remote.call(ledger.trial_workers)
            held = actor_spans.unbilled_s(spans, workers, time.time())
            for actor_id, held_s in held.items():
                usd = cost_usd(plan.price_usd_per_hour, held_s)
                remote.call(ledger.charge_once, f"actor:{actor_id}", usd)
            return
        if not trial_ids:
            return
        idle_s = sum(remote.call(ledger.idle_tails, sorted(trial_ids)).values())
        if idle_s > 0:
            key = f"idle:{phase}:{uuid.uuid4().hex[:8]}"  # its own key: a retry adds nothing
            remote.call(ledger.charge_once, key, cost_usd(plan.price_usd_per_hour, idle_s))
    except Exception:  # noqa: BLE001 - never mask how the phase ended; settled from SQL then
        pass


def _gate(spec: SweepSpec, plan: Plan, tracking_uri: str, sweep_id: str, ledger):
    """The staged strategy's decision after the LoRA sweep: run full FT or not, and why."""
    from orchestrator.report import ADAPTER_METHODS, full_ft_gate

    rows = leaderboard.trial_rows(tracking_uri, leaderboard.find_sweep(tracking_uri, sweep_id))
    # rows come ranked by the objective: the best LoRA trial is the first adapter one
    best_lora = leaderboard.best_row([r for r in rows if r.method in ADAPTER_METHODS])
    snap = remote.call(ledger.snapshot)
    measured = _ledger_timings(ledger)
    return full_ft_gate(
        max_runs=spec.full.max_runs,
        gate=spec.full.gate,
        target_score=spec.full.target_score,
        best_lora_score=best_lora.score if best_lora else None,
        predicted_usd=plan.admission_usd(measured, {"method": "full"}),
        remaining_usd=snap["remaining_usd"],
    )


def _start_ledger(spec: SweepSpec, plan: Plan, sweep_id: str, service_db: str):
    """The sweep's ledger as a named Ray actor that comes back after a crash, rebuilt from SQL
    (it writes SQL before it changes its memory), keeping the watchdog's allowance per trial;
    returned as an ``ActorRef`` (what Tune pickles is its name, not a handle)."""
    import ray

    from orchestrator.budget import Ledger
    from orchestrator.costmodel import spec_calibration_key
    from orchestrator.watchdog import allowance_usd

    name = f"lorasweep-ledger-{sweep_id}"
    handle = (
        ray.remote(Ledger)
        .options(name=name, num_cpus=0, max_restarts=-1, max_task_retries=3)
        .remote(
            spec.budget_usd,
            sweep_id=sweep_id,
            store_url=service_db,
            name=spec.name,
            calibration_key=spec_calibration_key(spec),
            allowance_usd=allowance_usd(plan.price_usd_per_hour),
        )
    )
    return remote.ActorRef(name, handle)


def _settle_everything(spec: SweepSpec, ledger, sweep_id: str, service_db: str, started) -> dict:
    """Close every account still open and return the ledger's snapshot: a trial that started
    at no less than its ceiling (what it spent after its last heartbeat is not known), a
    reservation that never started at its spend (nothing). Straight from SQL when the ledger
    actor does not answer (killed first, so that a late call cannot reopen what SQL closed)."""
    import ray

    from orchestrator.budget import Ledger

    def close(accounts: dict, settle) -> None:
        for trial_id, acct in accounts.items():
            at = max(acct["spent_usd"], acct["ceiling_usd"]) if trial_id in started else 0.0
            settle(trial_id, at)

    try:
        close(
            remote.call(ledger.open_accounts, tries=2),
            lambda trial_id, usd: remote.call(ledger.settle, trial_id, usd, tries=2),
        )
        return remote.call(ledger.snapshot, tries=2)
    except remote.ActorUnavailable:
        ray.kill(ledger.handle, no_restart=True)
        local = Ledger(spec.budget_usd, sweep_id=sweep_id, store_url=service_db, name=spec.name)
        try:
            close(local.open_accounts(), local.settle)
            return local.snapshot()
        finally:
            local.close()


def _end_failed(tracker, snap: dict, console) -> None:
    """Mark the parent run failed; an MLflow error here must not hide the sweep's own cause."""
    from orchestrator.callbacks import retried

    try:
        retried(tracker.end_sweep, "failed", snap, [], tries=2)
    except Exception as exc:  # noqa: BLE001 - reported, the original cause is raised
        console.print(f"[yellow]MLflow[/] could not mark the sweep failed: {type(exc).__name__}")


PHASE_TAG = "lorasweep.phase."  # + phase: the end reason of a phase that finished


def _run_phases(spec, plan, sweep_id, ledger, callback, optuna_url, tracking_uri, console):
    """The LoRA phase, then (if the gate calls for it and nothing stopped the sweep) full FT;
    returns (end reason, skipped proposals, gate reason). A phase that finished in an earlier
    part of the sweep (``lorasweep resume``) is not run again."""

    run_phase = functools.partial(_run_phase, spec, plan, sweep_id, ledger, callback, optuna_url)
    tracker, control = callback.tracker, callback.control
    done = {
        k[len(PHASE_TAG) :]: v for k, v in tracker.sweep_tags().items() if k.startswith(PHASE_TAG)
    }

    def phase(space, name: str, samples: int, default_reason: str) -> tuple[str, list[str]]:
        if name in done:
            return done[name], []
        searcher = run_phase(space, name, samples)
        reason = searcher.exhausted_reason or default_reason
        if not (control.fatal or control.interrupted):
            callback.outbox.put(
                tracker.client.set_tag, tracker.parent_id, PHASE_TAG + name, reason[:5000]
            )
        return reason, list(searcher.skipped)

    reason, skipped = phase(
        spec.search_space, "lora", spec.max_trials, f"max_trials ({spec.max_trials}) reached"
    )
    if control.fatal or control.interrupted or control.ended:
        return control.ended or reason, skipped, ""
    callback.drain()  # the gate reads the LoRA trials back from MLflow
    if control.fatal:
        return reason, skipped, ""
    run_full, gate_reason = _gate(spec, plan, tracking_uri, sweep_id, ledger)
    console.print(f"[bold]full fine-tuning[/] {'runs' if run_full else 'skipped'}: {gate_reason}")
    if run_full:
        full_space = spec.search_space.model_copy(
            update={
                "method": Dim(value="full"),
                "learning_rate": spec.full.learning_rate,
                "full_lr_scale": 1.0,
            }
        )
        full_reason, full_skipped = phase(full_space, "full", spec.full.max_runs, reason)
        reason = full_reason or reason
        skipped += full_skipped
    return reason, skipped, gate_reason


def run_sweep(
    spec: SweepSpec,
    console,
    address: str | None = None,
    resume: str | None = None,
    spec_path: Path | None = None,
    sweep_id: str | None = None,
    experiment: str | None = None,
) -> SweepResult:
    """Run a whole sweep (or, with ``resume``, continue sweep ``resume`` where it stopped) and
    return its leaderboard; raises before any spend on bad input, and :class:`SweepAborted`
    (every account settled, the cause in one line) on a persistent error of MLflow, the SQL
    store or the ledger. ``sweep_id`` and ``experiment`` (the MLflow experiment's name, default
    the spec's name) are set by the service, which names sweeps before they run."""
    from orchestrator.lifecycle import DriverHeartbeat
    from orchestrator.store import Store
    from orchestrator.watchdog import SweepControl

    t0 = time.time()
    _quiet_libraries()
    console.print("[bold]checking[/] spec, data, model and prices ...")
    plan = make_plan(spec)
    spec = pack_sweep.resolved(spec, plan)  # resources.pack_slots: auto -> the K make_plan chose
    data_dir, tracking_uri, optuna_url, service_db = storage_urls(spec)
    data_dir.mkdir(parents=True, exist_ok=True)
    sweep_id = resume or sweep_id or f"{spec.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    store = Store(service_db)
    console.print(
        f"[bold]{'resuming' if resume else 'sweep'}[/] {sweep_id}: budget ${spec.budget_usd:g}, "
        f"trial resources ${plan.price_usd_per_hour:.4f}/h, first rung predicted "
        f"${plan.admission_usd({}, plan.extremes(spec.search_space)[0]):.5f}"
    )
    if os.environ.get("LORASWEEP_FAULT"):
        console.print(
            f"[bold red]fault injection on[/]: LORASWEEP_FAULT={os.environ['LORASWEEP_FAULT']}"
        )
    if resume:  # a packed sweep's trials cannot resume yet: refused here, settled, unspent
        from orchestrator import pack_resume

        pack_resume.refuse(spec, store, sweep_id, tracking_uri, service_db)
    _init_ray(spec, address)
    crashed = _crash_settlements(store, sweep_id, plan) if resume else {}
    control = SweepControl()
    # from the claim to the last settlement: the heartbeat says this driver is alive (no second
    # driver may take the sweep), and Ctrl-C is handled (the second one cuts waits short)
    with _interrupts(control, console), DriverHeartbeat(store, sweep_id):
        return _drive(
            spec,
            console,
            plan,
            store,
            sweep_id,
            control,
            crashed,
            resume,
            spec_path,
            experiment,
            t0,
        )


def _drive(
    spec, console, plan, store, sweep_id, control, crashed, resume, spec_path, experiment, t0
):
    """``run_sweep`` once this driver holds the sweep."""
    from orchestrator.callbacks import SweepCallback
    from orchestrator.pack_watchdog import make_watchdog

    data_dir, tracking_uri, optuna_url, service_db = storage_urls(spec)
    ledger = _start_ledger(spec, plan, sweep_id, service_db)
    remote.call(ledger.snapshot)  # the actor is up and the sweep's row written
    for key, usd in crashed.items():  # the dead driver's open accounts: at their crash spend
        remote.call(ledger.update, key, usd)
    store.set_sweep(
        sweep_id,
        state="running",
        end_reason=None,
        spec_path=str(spec_path.resolve()) if spec_path else None,
    )
    tracker = _open_tracker(spec, plan, sweep_id, tracking_uri, data_dir, resume, experiment)
    watchdog = make_watchdog(spec, ledger, plan.price_usd_per_hour, control, sweep_id).start()
    callback = None
    try:
        if True:  # (indented as the phases were under the heartbeat: kept for a small diff)
            known = _known_base(tracker, store, sweep_id) if resume else None
            base = _base_eval(spec, plan, ledger, console, tracker) if known is None else known
            base = base or None  # {}: paid in an earlier part, without a score
            callback = SweepCallback(
                sweep_id=sweep_id,
                tracker=tracker,
                ledger=ledger,
                price_usd_per_hour=plan.price_usd_per_hour,
                cost_model=plan.cost_model,
                fixed_params={**_fixed_params(spec, plan), "base_model": spec.model.name_or_path},
                console=console,
                base_score=base["score"] if base else None,
                control=control,
                watchdog=watchdog,
                max_consecutive_failures=spec.max_consecutive_failures,
            )
            callback._count = _trial_count(tracker)
            if resume:
                callback.known_runs = _known_runs(tracker)
            reason, skipped, gate_reason = _run_phases(
                spec, plan, sweep_id, ledger, callback, optuna_url, tracking_uri, console
            )
    except KeyboardInterrupt:  # the second Ctrl-C: stop at once, settle as for the first
        control.interrupted = True
    except BaseException as exc:  # noqa: BLE001 - settled below, then raised as SweepAborted
        control.fail(f"{type(exc).__name__}: {exc}")
    finally:
        if control.fatal or control.interrupted:
            watchdog.kill_all()  # nothing of this sweep may go on billing
        watchdog.stop()
        control.settling = True  # a Ctrl-C from here on cuts the waits short, never the settling
        if callback is not None:  # what the trials logged reaches MLflow before it is read
            failed = control.fatal is not None
            callback.drain(
                DRAIN_AFTER_ERROR_S if failed or control.at_once else None, stop_on_fatal=not failed
            )
            callback.outbox.close()
    if control.fatal or control.interrupted:
        started = {"baseline", *(callback.started_ids if callback else ())}
        snap = _settle_everything(spec, ledger, sweep_id, service_db, started)
    if control.fatal:
        _end_failed(tracker, snap, console)
        store.set_sweep(sweep_id, state="failed", end_reason=control.fatal[:500])
        raise SweepAborted(
            f"sweep {sweep_id} stopped: {control.fatal} (spent ${snap['spent_usd']:.5f} of "
            f"${spec.budget_usd:g}, every account settled; lorasweep resume {sweep_id} "
            "continues it)"
        )
    if control.interrupted:
        reason = "interrupted"
    elif control.ended:
        reason = control.ended
    for reason_skipped in skipped:
        console.print(f"[yellow]not launched[/] {reason_skipped}")  # "budget: ..." or "memory: ..."
    if watchdog.kills:
        console.print(f"[yellow]watchdog[/] killed {len(watchdog.kills)} trial(s) past their grant")
    leftover = remote.call(ledger.settle_open, "spent")  # nothing may stay committed
    if leftover:
        console.print(f"[yellow]settled[/] {len(leftover)} account(s) no trial closed")
    snap = remote.call(ledger.snapshot)
    try:
        costs = {a.key: a.spent_usd for a in store.accounts(sweep_id)}
        dangling = "interrupted" if control.interrupted or resume else "failed"
        tracker.close_open_trials(dangling, costs)
        rows, best = _summarize(
            spec, tracker, tracking_uri, sweep_id, base, snap, reason, gate_reason, skipped
        )
    except Exception as exc:  # every account is settled: say why the summary is missing
        raise SweepAborted(
            f"sweep {sweep_id}: its trials ended (spent ${snap['spent_usd']:.5f}) but its "
            f"summary could not be written to MLflow: {type(exc).__name__}: {redact(str(exc))}"
        ) from exc
    store.set_sweep(
        sweep_id, state="interrupted" if control.interrupted else "completed", end_reason=reason
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
        interrupted=control.interrupted,
    )


DRAIN_AFTER_ERROR_S = 30.0  # the sweep already failed or the user insists: wait less for MLflow


def _known_runs(tracker) -> dict[str, tuple[str, str]]:
    """The sweep's child runs by trial id: (run id, run name)."""
    from orchestrator.callbacks import retried

    return {
        r.data.tags["lorasweep.trial_id"]: (r.info.run_id, r.info.run_name)
        for r in retried(tracker.trial_runs)
        if "lorasweep.trial_id" in r.data.tags
    }


def _trial_count(tracker) -> int:
    """How many trials the sweep already has (the next one's number is one more)."""
    from orchestrator.callbacks import retried

    return retried(tracker.count_trials)


def _crash_settlements(store, sweep_id: str, plan: Plan) -> dict[str, float]:
    """Before resuming: refuse what cannot be resumed, and price the accounts its dead driver
    left open (``orchestrator.lifecycle.crash_settlements``)."""
    from orchestrator.lifecycle import STALE_S, UNFINISHED, crash_settlements, effective_state

    row = store.sweep(sweep_id)
    if row is None:
        raise LorasweepError(f"SWEEP: no sweep {sweep_id!r} in {redact(store.url)}")
    state = effective_state(row)
    if state == "running":
        raise LorasweepError(
            f"SWEEP: {sweep_id} is running (its driver is alive); nothing to resume"
        )
    if state not in (*UNFINISHED, "failed"):
        raise LorasweepError(f"SWEEP: {sweep_id} is {state}; only an unfinished sweep resumes")
    settlements = crash_settlements(store, sweep_id, plan.price_usd_per_hour)
    if not store.claim_driver(sweep_id, STALE_S):  # another resume got there first
        raise LorasweepError(
            f"SWEEP: {sweep_id} is being resumed by another driver; watch it with "
            f"lorasweep status {sweep_id}"
        )
    return settlements


def _open_tracker(spec, plan, sweep_id, tracking_uri, data_dir, resume, experiment=None) -> Tracker:
    """The sweep's MLflow parent run: a new one, or the earlier part's when resuming."""
    tracker = Tracker(tracking_uri, experiment or spec.name, artifact_root=data_dir / "artifacts")
    if resume:
        tracker.attach_sweep(sweep_id)
        return tracker
    tracker.start_sweep(
        sweep_id,
        spec.public_dump(),  # passwords in storage URLs hidden
        {
            "budget_usd": spec.budget_usd,
            "model": spec.model.name_or_path,
            "accelerator": spec.resources.accelerator,
            "price_usd_per_hour": plan.price_usd_per_hour,
            "max_trials": spec.max_trials,
            "objective": spec.objective.metric,
            "objective_mode": spec.objective.mode,  # how the leaderboard and promote rank
        },
    )
    return tracker


BASE_KEYS = ("score", "eval_loss", "cost_usd")


def _known_base(tracker, store, sweep_id: str) -> dict | None:
    """The base eval of an earlier part of the sweep (paid once, never again): its score and
    cost from the parent run, ``{}`` when it was paid without a score (it timed out), None when
    it was never paid."""
    if "baseline" not in {a.key for a in store.accounts(sweep_id)}:
        return None
    metrics = tracker.sweep_metrics()
    known = {k: metrics[f"base_{k}"] for k in BASE_KEYS if f"base_{k}" in metrics}
    return known if len(known) == len(BASE_KEYS) else {}


def _base_eval(spec: SweepSpec, plan: Plan, ledger, console, tracker) -> dict | None:
    """The base model's score, said on the console and kept on the parent run (None when it was
    not paid or timed out)."""
    console.print("[bold]scoring[/] the base model on the validation split ...")
    base = _score_base(spec, plan, ledger)
    if base and base.get("stopped"):
        console.print(
            f"  [yellow]base model eval[/] {base['stopped']} (${base['cost_usd']:.5f}); going on "
            "without a base score"
        )
        return None
    if base:
        console.print(
            f"  base model score {base['score']:.3f}  eval_loss {base['eval_loss']:.4f}  "
            f"${base['cost_usd']:.5f}"
        )
        tracker.log_sweep_metrics({f"base_{k}": base[k] for k in BASE_KEYS}, 0)
    return base


@contextlib.contextmanager
def _interrupts(control, console):
    """Ctrl-C (SIGINT) or SIGTERM: no new trial or phase starts, running trials close (final
    eval and save inside their grants) and every account is settled; a second one stops at once
    (and still settles). Tune's own SIGINT
    handler is off (``TUNE_DISABLE_SIGINT_HANDLER``): it makes ``fit()`` return as if done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if getattr(control, "settling", False):  # the trials ended: settle, waiting less
            control.at_once = True
            console.print("[yellow]settling every account[/]; waits cut short")
            return
        if control.interrupted:
            control.interrupt()
            raise KeyboardInterrupt
        control.interrupt()
        console.print(
            f"[yellow]{signal.Signals(signum).name}[/]: no new trial starts; the running trials "
            "close with their final eval and adapter save inside their grants, then every account "
            "is settled (again to stop at once)"
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _fixed_params(spec: SweepSpec, plan: Plan) -> dict:
    """The trial settings every trial shares, logged on each child run."""
    keep = ("max_steps", "eval_every", "batch_size", "max_seq_len", "seed", "dtype")
    base = _base_trial_config(spec, plan)
    return {k: base[k] for k in (*keep, "price_usd_per_hour")}
