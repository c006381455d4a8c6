"""Search: the Optuna space from a spec; a Tune searcher that admits trials only within budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ray.tune.search import Searcher

from orchestrator.memory_lessons import MemoryLessons
from orchestrator.spec import HYPERPARAMETERS, Dim, SearchSpace, config_label

MAX_CONSECUTIVE_SKIPS = 20


def _suggest(trial, name: str, dim: Dim):
    if dim.value is not None:
        return dim.value
    if dim.choices is not None:
        return trial.suggest_categorical(name, dim.choices)
    if all(isinstance(v, int) for v in (dim.low, dim.high)) and name == "rank":
        return trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, log=dim.log)


class DefineByRun:
    """An Optuna define-by-run space: searched dims are suggested (OptunaSearch captures them),
    fixed ones are returned as constants that Ray merges into the trial config. A class rather
    than a closure because OptunaSearch pickles its space when Tune checkpoints the experiment."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial) -> dict:
        for name in HYPERPARAMETERS:
            _suggest(trial, name, getattr(self.space, name))
        return {**self.space.fixed_values(), "full_lr_scale": self.space.full_lr_scale}


@dataclass(frozen=True)
class Prediction:
    """What a config is predicted to cost and take, before it launches."""

    admission_usd: float  # up to its first early-stopping rung (what admission reserves)
    trial_usd: float  # all its steps and evals (kept to compare with what it spends)
    step_s: float
    closing_s: float
    startup_s: float = 0.0


class BudgetedSearcher(Searcher):
    """Wraps a searcher (OptunaSearch) with budget admission, in two steps:

    1. before asking the search, reserve what the space's cheapest config needs up to its first
       rung; if even that does not fit, the sweep ends (or waits for a running trial to settle);
    2. once the search proposed a config, resize the reservation to that config's own prediction;
       if that does not fit, the config is never launched (recorded as skipped, reported to
       Optuna as failed) and the search is asked again.

    So a trial starts only if spent + reserved + its prediction <= cap.

    A trial that ran out of memory teaches ``lessons``: its size is not proposed again
    (``orchestrator/memory_lessons.py``).

    Also reports early-stopped trials (ASHA or budget) to the inner searcher without a final
    value, which OptunaSearch records as PRUNED rather than COMPLETE: a cut trial's last score is
    not comparable with a finished one's, and calling it complete misleads TPE.
    """

    def __init__(
        self,
        searcher: Searcher,
        ledger,
        predict: Callable[[dict], Prediction],
        cheapest: dict,
        fit_memory: Callable[[dict], tuple[dict, str | None]] | None = None,
        stopping: Callable[[], bool] | None = None,
        lessons: MemoryLessons | None = None,
    ) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.ledger = ledger
        self.predict = predict
        self.cheapest = cheapest  # hyperparameters of the space's cheapest config
        self.fit_memory = fit_memory
        self.stopping = stopping  # the sweep was interrupted: propose nothing more
        self.lessons = lessons  # sizes that ran out of memory: not proposed again
        self._proposed: dict[str, dict] = {}  # running trials' configs, to learn from a failure
        self.exhausted_reason: str | None = None
        self.skipped: list[str] = []  # configs never launched, with the reason
        self._consecutive_skips = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False  # let Tune's ConcurrencyLimiter do it

    def suggest(self, trial_id: str):
        from orchestrator import remote

        if self.stopping is not None and self.stopping():
            # the search is over for this driver (resume un-finishes it): Tune ends the phase
            # once the running trials have closed; with none running it must not wait for one
            return Searcher.FINISHED
        floor = self.predict(self.cheapest).admission_usd
        if not remote.call(self.ledger.reserve, trial_id, floor):
            snap = remote.call(self.ledger.snapshot)
            if snap["running"]:
                return None  # ask again once a running trial has settled and freed its ceiling
            allowance = snap.get("allowance_usd", 0.0)
            self.exhausted_reason = (
                f"budget: the cheapest next trial needs ${floor:.6f} to reach its first rung "
                f"+ ${allowance:.6f} watchdog allowance, ${snap['remaining_usd']:.6f} is left "
                "unspent"
            )
            return Searcher.FINISHED
        config = self.searcher.suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            remote.call(self.ledger.settle, trial_id, 0.0)
            return config
        updates, reason = self.fit_memory(config) if self.fit_memory else ({}, None)
        if reason is None and self.lessons is not None:
            learned, reason = self.lessons.adjust({**config, **updates})
            updates = {**updates, **learned}
        if reason is None:
            config = {**config, **updates}
            p = self.predict(config)
            if remote.call(self.ledger.resize, trial_id, p.admission_usd, p.trial_usd):
                self._consecutive_skips = 0
                self._proposed[trial_id] = config
                return {
                    **config,
                    "predicted_step_s": p.step_s,
                    "predicted_closing_s": p.closing_s,
                    "predicted_startup_s": p.startup_s,
                }
            reason = (
                f"budget: {config_label(config)} needs ${p.admission_usd:.6f} to its first rung, "
                "more than is left now"
            )
        return self._skip(trial_id, reason)

    def _skip(self, trial_id: str, reason: str):
        """Never launched, nothing spent: free the reservation, tell Optuna it failed."""
        from orchestrator import remote

        remote.call(self.ledger.settle, trial_id, 0.0)
        self.searcher.on_trial_complete(trial_id, result=None, error=True)
        self.skipped.append(reason)
        self._consecutive_skips += 1
        if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            self.exhausted_reason = (
                f"{reason.split(':')[0]}: {self._consecutive_skips} proposals in a row do not fit"
            )
            return Searcher.FINISHED
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:  # a failed trial's report has no score
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        """Completed trials are told with their value, failed ones as FAIL, cut ones (ASHA,
        budget, interrupt) without one: PRUNED."""
        status = (result or {}).get("trial_status")
        full = status == "completed"
        failed = error or status == "failed"
        config = self._proposed.pop(trial_id, None)
        if failed and config is not None and self.lessons is not None:
            self.lessons.learn(config, (result or {}).get("error"))
        self.searcher.on_trial_complete(trial_id, result=result if full else None, error=failed)

    def get_state(self) -> dict:
        lessons = self.lessons.get_state() if self.lessons is not None else []
        return {
            "exhausted_reason": self.exhausted_reason,
            "skipped": self.skipped,
            "memory_failures": lessons,
        }

    def set_state(self, state: dict) -> None:
        self.exhausted_reason = state.get("exhausted_reason")
        self.skipped = state.get("skipped", [])
        if self.lessons is not None:
            self.lessons.set_state(state.get("memory_failures", []))

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
