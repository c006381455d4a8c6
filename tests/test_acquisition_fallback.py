"""The cost-aware TPE hooks private Optuna methods: where an Optuna release changes them, the
sampler says so and searches as plain TPE instead of breaking (CPU, no Ray)."""

from __future__ import annotations

import warnings

import optuna
import pytest
from optuna.samplers import TPESampler

from orchestrator.acquisition import (
    CostAwareFallback,
    CostAwareTPESampler,
    hook_problem,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(sampler) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def objective(trial):
        trial.suggest_categorical("rank", [4, 64])
        x = trial.suggest_float("x", 0, 1)
        return -((x - 0.3) ** 2)

    study.optimize(objective, n_trials=14)
    return study


def test_the_installed_optuna_fits_the_hooks():
    assert hook_problem() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostAwareFallback)
        sampler = CostAwareTPESampler(cost_of=lambda hp: 1.0, seed=0, n_startup_trials=4)
    assert sampler.fallback is None


def test_a_changed_signature_is_named():
    class Changed(TPESampler):  # as a later Optuna might reshape the private method
        def _compute_acquisition_func(self, samples, mpe_below, mpe_above, weights=None):
            return super()._compute_acquisition_func(samples, mpe_below, mpe_above)

    problem = hook_problem(Changed)
    assert "_compute_acquisition_func" in problem and "weights" in problem

    class Gone(TPESampler):
        _sample = None

    assert "TPESampler._sample" in hook_problem(Gone)


def test_a_changed_optuna_falls_back_to_plain_tpe_with_a_warning(monkeypatch):
    original = TPESampler._compute_acquisition_func

    def reshaped(self, samples, mpe_below, mpe_above, *, temperature=1.0):
        return original(self, samples, mpe_below, mpe_above)

    # the installed Optuna's private method as a later release might have it (a new parameter)
    monkeypatch.setattr(TPESampler, "_compute_acquisition_func", reshaped)
    with pytest.warns(CostAwareFallback, match="plain TPE.*temperature"):
        sampler = CostAwareTPESampler(cost_of=lambda hp: hp["rank"], seed=1, n_startup_trials=4)
    study = _study(sampler)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 14  # the search went on
    assert sampler.acquisitions == 0  # as plain TPE: candidates were never priced
    assert sampler.fallback and "temperature" in sampler.fallback


def test_with_the_hooks_in_place_candidates_are_priced():
    sampler = CostAwareTPESampler(cost_of=lambda hp: hp["rank"], seed=1, n_startup_trials=4)
    _study(sampler)
    assert sampler.acquisitions > 0
