"""The driver's Tune callback: ledger bookkeeping, MLflow child runs and live progress.

Nothing here may kill the sweep with accounts open: every hook runs guarded. Trial results and
ends go to MLflow through an outbox (``orchestrator/outbox.py``) so a down server does not hold
Tune's loop; the few calls that must answer at once (a trial's child run) are retried with
backoff; a ledger or MLflow error that persists is recorded in ``control.fatal``, and
:class:`SweepStopper` then stops every trial so the driver can settle and say why.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

import ray
from ray.tune import Callback, Stopper

from orchestrator import remote
from orchestrator.outbox import Outbox
from orchestrator.prices import cost_usd
from orchestrator.retry import with_backoff
from orchestrator.run_notes import config_summary
from orchestrator.secrets import redact
from orchestrator.spec import HYPERPARAMETERS
from orchestrator.watchdog import SweepControl

NODE_TAG = "lorasweep.ray_node_id"  # the Ray node a trial ran on (its worker's report)
MLFLOW_DRAIN_S = float(os.environ.get("LORASWEEP_MLFLOW_DRAIN_S", "600"))
MLFLOW_TRIES = 4  # 0.5 + 1 + 2 s of backoff: rides out a restarting server or a locked sqlite


def retried(fn, *args, tries: int = MLFLOW_TRIES, **kwargs):
    """``fn(*args, **kwargs)`` (an MLflow call), retried with exponential backoff; the last error
    is raised."""
    return with_backoff(lambda: fn(*args, **kwargs), tries=tries, first_s=0.5)


def _readable(checkpoint) -> bool:
    """Whether a Tune checkpoint's folder exists where this driver reads its storage."""
    from pyarrow.fs import FileType

    try:
        return checkpoint.filesystem.get_file_info(checkpoint.path).type == FileType.Directory
    except Exception:  # noqa: BLE001 - an unreachable store: not readable
        return False


def best_checkpoint(trial) -> tuple:
    """(checkpoint, its report's metrics) of the trial's best eval by the objective (Tune's
    ``CheckpointConfig`` ranks them, ``orchestrator/sweep.py``), else its latest; (None, {}) when
    it reported no checkpoint."""
    try:
        result = trial.run_metadata.checkpoint_manager.best_checkpoint_result
    except AttributeError:  # not a Tune trial of this Ray version: its latest checkpoint
        result = None
    if result is not None and result.checkpoint is not None:
        return result.checkpoint, dict(result.metrics or {})
    return trial.checkpoint, {}


def _guarded(hook):
    """A Tune hook that records its failure in ``self.control`` instead of raising."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - named in one line, the sweep then stops
            self.control.fail(redact(f"{hook.__name__}: {type(exc).__name__}: {exc}"))
        return None

    return wrapper


# this driver's live control of each sweep it runs: a stopper restored by ``Tuner.restore`` finds
# the resuming driver's control here, not the stopped driver's pickled copy
_LIVE_CONTROLS: dict[str, SweepControl] = {}


class SweepStopper(Stopper):
    """Stops a trial whose grant the watchdog revoked (at its next report) and every trial once
    the sweep must end (a persistent error, or the user's interrupt).

    Tune saves its stopper with the experiment and puts the saved one back on restore, over the
    one the resuming driver passes: pickled, it keeps only the sweep id, so a resumed sweep is not
    stopped by the Ctrl-C that ended its earlier part."""

    def __init__(self, sweep_id: str, control: SweepControl) -> None:
        self.sweep_id = sweep_id
        _LIVE_CONTROLS[sweep_id] = control

    @property
    def control(self) -> SweepControl:
        return _LIVE_CONTROLS.get(self.sweep_id) or SweepControl()

    def __getstate__(self) -> dict:
        return {"sweep_id": self.sweep_id}

    def __setstate__(self, state: dict) -> None:
        self.sweep_id = state["sweep_id"]

    def __call__(self, trial_id: str, result: dict) -> bool:
        return trial_id in self.control.revoked

    def stop_all(self) -> bool:
        return self.control.must_stop_all()


def interrupted(sweep_id: str) -> bool:
    """Whether this driver's sweep ``sweep_id`` was interrupted (no new trial may start)."""
    control = _LIVE_CONTROLS.get(sweep_id)
    return bool(control and control.interrupted)


@dataclass
class _Live:
    run_id: str
    name: str
    started: float  # driver monotonic time of on_trial_start
    trial: object = None  # Tune's Trial
    last_result: dict = field(default_factory=dict)
    last_result_at: float | None = None  # driver monotonic time of the last report
    node_tagged: bool = False  # the child run carries the trial's Ray node id
    # per metric key, the last step already in the child run: a retried or resumed attempt goes
    # on from its checkpoint and reports again the steps its lost attempt had reported since
    # (None: not yet read from MLflow; a resumed trial's run holds an earlier part's steps)
    logged_steps: dict | None = None


def trial_params(config: dict) -> dict:
    """What a trial runs with, as logged: hyperparameters (full FT's effective lr), any memory
    adjustment the admission made and the K of the pack it ran in (``pack_sweep.PackedFit``)."""
    params = {k: config.get(k) for k in HYPERPARAMETERS}
    if params["method"] == "full":
        params["learning_rate"] *= config.get("full_lr_scale", 1.0)
        for k in HYPERPARAMETERS[2:]:  # adapter options mean nothing for full FT
            params.pop(k)
    for k in ("gradient_checkpointing", "micro_batch", "predicted_gib"):
        if k in config:
            params[k] = config[k]
    params["pack_slots"] = int(config.get("pack_slots", 1))  # K of its pack; 1: unpacked
    return params


def describe(p: dict) -> str:
    """One line of a trial's config, as the console and its MLflow description say it."""
    return config_summary(p)


def _predictions(config: dict) -> dict[str, float]:
    """The admission's predictions for a trial, logged once on its run (at step 0) beside what
    it measures (``measured_*`` at its end)."""
    keys = ("predicted_step_s", "predicted_closing_s", "predicted_startup_s")
    return {k: float(config[k]) for k in keys if k in config}


def _kill(trial) -> None:
    """Kill a trial's actor (the watchdog's last resort); Tune then errors the trial, and does
    not retry it (``FailureConfig`` retries are for lost workers, not for a spent grant)."""
    trial.max_failures = 0  # Tune's Trial.should_recover reads it
    actor = trial.temporary_state.ray_actor  # Tune's handle on the trial's worker
    if actor is not None:
        ray.kill(actor, no_restart=True)


class SweepCallback(Callback):
    """Keeps the ledger, MLflow and the console in step with Tune's view of the trials.

    A trial's final bill is the most of: its last reported billed seconds plus the time since
    that report (an early-stopped trial keeps its resources until Tune releases them), the time
    since Tune started it, its last heartbeat (the ledger keeps the highest), and what the
    watchdog settled it at if it was killed. The driver-side times are on this process's
    monotonic clock.
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
        control: SweepControl | None = None,
        watchdog=None,
        max_consecutive_failures: int = 3,
    ) -> None:
        self.sweep_id, self.tracker, self.ledger = sweep_id, tracker, ledger
        self.price_usd_per_hour = price_usd_per_hour
        self.cost_model = cost_model  # turns a measured step time into the method's FLOP/s
        self.fixed_params, self.console, self.base_score = fixed_params, console, base_score
        self.live: dict[str, _Live] = {}
        self.finished: list[dict] = []
        self._count = 0
        self._reports = 0
        self.control = control or SweepControl()
        self.watchdog = watchdog
        self.started_ids: set[str] = set()  # every trial Tune started (its spend is real)
        self.max_consecutive_failures = max_consecutive_failures
        self._failures_in_a_row = 0
        # MLflow writes off Tune's loop: a down server must not hold the trials in report
        self.outbox = Outbox(on_outage=self.control.fail)
        # a resumed sweep's child runs by trial id: (run id, name), read once at its start
        self.known_runs: dict[str, tuple[str, str]] = {}

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state; the live MLflow client and the
        # console are not picklable and are re-supplied when a sweep is resumed.
        live = ("tracker", "console", "watchdog", "outbox")
        return {k: v for k, v in self.__dict__.items() if k not in live}

    # --- Tune hooks ---------------------------------------------------------------------------
    @_guarded
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id in self.live:  # a retry after its worker was lost: same run, watched
            self._restart(trial)
            return
        if not self._account_open(trial):
            return
        self._count += 1
        self.started_ids.add(trial.trial_id)
        self.control.running.add(trial.trial_id)
        now = time.monotonic()
        name = f"trial-{self._count:03d}"
        self.live[trial.trial_id] = _Live("", name, now, trial)
        if self.watchdog is not None:
            self.watchdog.watch(trial.trial_id, functools.partial(_kill, trial))
        params = trial_params(trial.config)
        predicted = remote.call(self.ledger.predicted, trial.trial_id)
        if predicted is not None:
            params["predicted_cost_usd"] = round(predicted, 6)
        remote.call(self.ledger.mark_started, trial.trial_id, time.time())  # for the record

        live = self.live[trial.trial_id]
        if trial.trial_id in self.known_runs:  # a resumed sweep keeps the trial's one child run
            live.run_id, live.name = self.known_runs[trial.trial_id]
        else:  # made by the outbox: a down MLflow must not hold Tune's loop (and every trial)
            live.logged_steps = {}  # a new run: nothing in it yet

            def open_run() -> None:  # find first: a create whose reply was lost made it already
                made = self.tracker.find_trial(self.sweep_id, trial.trial_id)
                live.run_id = (
                    made[0]
                    if made
                    else self.tracker.start_trial(
                        self.sweep_id,
                        name,
                        trial.trial_id,
                        {**params, **self.fixed_params},
                        _predictions(trial.config),
                    )
                )

            self.outbox.put(open_run)
        self.console.print(f"[bold]{live.name}[/] started  {describe(params)}")

    @_guarded
    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """The trial's worker was lost (killed, node gone, preempted); Tune retries it from its
        last checkpoint. Its account stays open: the new attempt's spend adds to the lost one."""
        live = self.live.get(trial.trial_id)
        if self.watchdog is not None:  # nothing is held until its new worker starts
            # the lost attempt ran until its loss was noticed (now), not only to its last beat
            lost_usd = self.watchdog.since_heartbeat_usd(trial.trial_id)
            self.watchdog.unwatch(trial.trial_id)
            if lost_usd is not None:
                remote.call(self.ledger.update, trial.trial_id, lost_usd)
        if live is not None:
            self.console.print(
                f"[yellow]{live.name}[/] lost its worker; retrying from its checkpoint"
            )

    def _account_open(self, trial) -> bool:
        """A trial restored by ``lorasweep resume`` whose account an earlier part settled (it was
        stopped there) runs again only on a reopened account, one rung's worth of grant, if the
        cap allows; otherwise it is stopped at once."""
        rung_s = (
            trial.config.get("predicted_startup_s", 0.0)
            + trial.config.get("predicted_step_s", 0.0) * self.fixed_params.get("eval_every", 1)
            + trial.config.get("predicted_closing_s", 0.0)
        )
        extra = 1.25 * cost_usd(self.price_usd_per_hour, rung_s)
        if remote.call(self.ledger.reopen, trial.trial_id, extra):
            return True
        self.control.revoked.add(trial.trial_id)
        _kill(trial)
        return False

    def _restart(self, trial) -> None:
        live = self.live[trial.trial_id]
        live.trial = trial
        if self.watchdog is not None:  # watched afresh: the new worker's heartbeats restart
            # from what the lost attempts spent: a retry lost before its first heartbeat (still
            # loading) is billed from there to its loss, not from zero
            prior_usd = remote.call(self.ledger.spent, trial.trial_id)
            self.watchdog.watch(trial.trial_id, functools.partial(_kill, trial), prior_usd)

    @_guarded
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        live = self.live[trial.trial_id]
        live.last_result, live.last_result_at = result, time.monotonic()
        remote.call(self.ledger.update, trial.trial_id, float(result["cost_usd"]))
        if result.get("trial_status") == "failed":  # no eval: the reason, shown at its end
            return
        reused = bool(result.get("base_model_reused"))
        measured = self.cost_model.measurements(trial.config, result, reused=reused)
        remote.call(self.ledger.calibrate, **measured)
        self.outbox.put(self._log_result, live, dict(result))
        if result.get("ray_node_id") and not live.node_tagged:
            live.node_tagged = True
            self.outbox.put(self._tag_node, live, str(result["ray_node_id"]))
        snap = remote.call(self.ledger.snapshot)
        self._reports += 1
        self.outbox.put(
            self.tracker.log_sweep_metrics,
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

    @_guarded
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        live = self.live.get(trial.trial_id)
        if live is None:
            return
        # no report at all: refused before its first step (or stopped before it)
        status = live.last_result.get("trial_status", "running" if live.last_result else None)
        closing = self.control.interrupted and trial.trial_id not in self.control.revoked
        if closing and status in (None, "running"):
            status = "interrupted"  # it closed before a step since its last report (if any)
        elif status is None or trial.trial_id in self.control.revoked:
            status = "budget_stopped"
        self._finish(trial, {"running": "pruned"}.get(status, status))

    @_guarded
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        killed = trial.trial_id in self.control.revoked
        self._finish(trial, "budget_killed" if killed else "failed")

    def _count_failure(self, failed: bool, error: str | None) -> None:
        """After ``max_consecutive_failures`` failed trials in a row the sweep stops, saying
        why (a broken dataset or model fails every config: no point paying for more)."""
        self._failures_in_a_row = self._failures_in_a_row + 1 if failed else 0
        if self._failures_in_a_row >= self.max_consecutive_failures and not self.control.ended:
            self.control.ended = redact(
                f"failures: {self._failures_in_a_row} trials in a row failed, the last with "
                f"{error or 'an unknown error'}"
            )

    def drain(self, timeout_s: float | None = None, stop_on_fatal: bool = True) -> None:
        """Wait until the queued MLflow writes landed (before anything reads MLflow back). An
        MLflow that stays unreachable stops the sweep (``control.fatal``, accounts settled); a
        write MLflow refused for good is named."""
        timeout_s = MLFLOW_DRAIN_S if timeout_s is None else timeout_s

        def stop() -> bool:  # the user insists, or (unless already failed) the sweep fails now
            return self.control.at_once or (stop_on_fatal and self.control.fatal is not None)

        if self.outbox.flush(timeout_s, stop=stop) or (stop_on_fatal and self.control.fatal):
            pass
        elif self.control.at_once:  # the user would not wait: say what MLflow lacks
            self.console.print(
                f"[yellow]MLflow[/]: {self.outbox.pending} writes not recorded (stopped at once)"
            )
        else:
            self.control.fail(
                f"MLflow: {self.outbox.pending} writes still unrecorded after {timeout_s:.0f} s "
                f"({self.outbox.failing})"
            )
        for error in self.outbox.errors:
            self.console.print(f"[yellow]MLflow refused a write[/]: {error}")
        self.outbox.errors.clear()

    def finish_open(self, status: str) -> list[str]:
        """Settle and close every trial Tune stopped without a word (an interrupt or an error
        stops trials without ``on_trial_complete``); returns their ids. A failure here is
        recorded in ``control`` and the rest go on."""
        closed = []
        for trial_id, live in list(self.live.items()):
            try:
                self._finish(live.trial, status)
                closed.append(trial_id)
            except Exception as exc:  # noqa: BLE001 - the driver settles it from SQL then
                self.control.fail(f"closing {live.name}: {type(exc).__name__}: {exc}")
        return closed

    # --- helpers ------------------------------------------------------------------------------
    # (outbox writes: they read the trial's run id when they run, after the outbox made the run)
    def _log_result(self, live: _Live, result: dict) -> None:
        if not live.run_id:
            return
        if live.logged_steps is None:  # a resumed trial's run: what its earlier parts logged
            live.logged_steps = self.tracker.logged_steps(live.run_id)
        self.tracker.log_trial_result(live.run_id, result, live.logged_steps)

    def _tag_node(self, live: _Live, node_id: str) -> None:
        if live.run_id:
            self.tracker.client.set_tag(live.run_id, NODE_TAG, node_id)

    def _end_run(self, live: _Live, *args) -> None:
        if live.run_id:
            self.tracker.end_trial(live.run_id, *args)

    def _finish(self, trial, status: str) -> None:
        self.control.running.discard(trial.trial_id)
        live = self.live.pop(trial.trial_id, None)
        if live is None:
            return
        tail_usd = self.watchdog.since_heartbeat_usd(trial.trial_id) if self.watchdog else None
        killed_usd = self.watchdog.unwatch(trial.trial_id) if self.watchdog else None
        now = time.monotonic()
        last = live.last_result
        # why the watchdog stopped what the trial ran on (a hung pack: pack_watchdog.py)
        if why := getattr(self.watchdog, "reasons", {}).get(trial.trial_id):
            last = {**last, "error": why + (f" ({last['error']})" if last.get("error") else "")}
            status = status if status == "budget_killed" else "failed"  # it did not finish
        price = self.price_usd_per_hour
        if killed_usd is not None:
            # billed to the kill (its process is gone then), not to whenever the driver's loop
            # came to this trial: a driver stalled on MLflow must not bill a dead process
            final_usd = max(killed_usd, remote.call(self.ledger.spent, trial.trial_id))
        elif (word := remote.call(self.ledger.final_word, trial.trial_id)) is not None:
            # the trial's own last word, on its process's clock, up to its function's end (a
            # reused worker's next trial bills from there; the phase's end bills the idle tail)
            final_usd = max(word, cost_usd(price, last.get("billed_s", 0.0)))
        elif tail_usd is not None:
            # no last word yet: Tune stopped it on a result (ASHA's last rung) while its function
            # still runs, or its worker died: its clock's last heartbeat seen, plus the time since
            final_usd = max(tail_usd, remote.call(self.ledger.spent, trial.trial_id))
        else:  # not watched (no watchdog) and no last word: the driver's clock
            tail_s = now - live.last_result_at if live.last_result_at else 0.0
            final_usd = cost_usd(price, max(last.get("billed_s", 0.0) + tail_s, now - live.started))
        billed_s = final_usd / price * 3600.0 if price > 0 else now - live.started
        remote.call(self.ledger.settle, trial.trial_id, final_usd)
        if "billed_s" in last and killed_usd is None:  # billed after the last report
            released = self.cost_model.release_measurement(
                trial.config, billed_s - last["billed_s"]
            )
            remote.call(self.ledger.calibrate, **released)
        # the adapter logged (and promoted) is the trial's best eval's, not its last one's
        checkpoint, best = best_checkpoint(trial) if last else (None, {})
        if checkpoint is not None and not _readable(checkpoint) and status != "failed":
            # the trial's adapter is not where the driver can read it (a worker node's own disk):
            # a loud failure, never a silently missing adapter
            status = "failed"
            last = {
                **last,
                "error": f"adapter missing: checkpoint {checkpoint.path} is not readable from "
                "the driver (put storage.data_dir on storage every node reads)",
            }
        final = {"cost_usd": final_usd, "billed_s": billed_s, "step": last.get("step", 0)}
        if status != "failed" and "step" in best:  # what the kept adapter scored, and when
            final["best_step"] = best["step"]
            for key in ("score", "eval_loss"):
                if key in best:
                    final[f"best_{key}"] = best[key]
        for key in ("step_s", "closing_s"):
            if key in last:
                final[f"measured_{key}"] = last[key]
        for key in ("tokens", "base_model_reused"):
            if key in last:
                final[key] = last[key]
        # where the billed seconds went (goodput = phase_step_s / billed_s); idle = what the
        # worker's phases do not explain: actor start, imports, the wait to be released
        phases = last.get("phases_s", {})
        final.update({f"phase_{k}_s": v for k, v in phases.items()})
        if phases:
            final["phase_idle_s"] = max(billed_s - sum(phases.values()), 0.0)
        self.outbox.put(
            self._end_run,
            live,
            status,
            dict(final),
            checkpoint.path if checkpoint is not None else None,
            last.get("error"),
        )
        self.finished.append(
            {"trial": live.name, "status": status, **final, "score": last.get("score")}
        )
        self._count_failure(status == "failed", last.get("error"))
        score = last.get("score")
        kept = ""  # the adapter kept is an earlier eval's: say which
        if "best_step" in final and final["best_step"] != last.get("step"):
            kept = (
                f" (kept step {final['best_step']}: score {final.get('best_score', 0):.3f}, "
                f"eval_loss {final.get('best_eval_loss', 0):.4f})"
            )
        self.console.print(
            f"[bold]{live.name}[/] {status}  score "
            f"{'-' if score is None else f'{score:.3f}'}{kept}  ${final_usd:.5f} "
            f"({billed_s:.0f} s billed)" + (f"  {redact(last['error'])}" if "error" in last else "")
        )
