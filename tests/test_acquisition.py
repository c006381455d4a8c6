"""The cost-aware acquisition: TPE's expected improvement per dollar (CPU, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from orchestrator.acquisition import CostAwareTPESampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


class _Density:
    """Stands in for a Parzen estimator: fixed log densities per candidate."""

    def __init__(self, log_pdf: list[float]) -> None:
        self._log_pdf = np.array(log_pdf)

    def log_pdf(self, samples) -> np.ndarray:
        return self._log_pdf


def _rank_space():
    return {"rank": optuna.distributions.CategoricalDistribution([4, 64])}


def test_ei_per_dollar_by_hand():
    # candidate 0: l/g = e^3 at cost 1; candidate 1: l/g = e^5 at cost 2; gamma = 0.1
    # EI ~ 1/(g + (1-g) g(x)/l(x)):  log EI0 = -log(0.1 + 0.9 e^-3) = 1.932
    #                                log EI1 = -log(0.1 + 0.9 e^-5) = 2.244, per dollar 1.551
    costs = {4: 1.0, 64: 2.0}
    sampler = CostAwareTPESampler(cost_of=lambda hp: costs[hp["rank"]])
    sampler._space, sampler._gamma_fraction = _rank_space(), 0.1
    samples = {"rank": np.array([0.0, 1.0])}  # internal repr: choice indices
    below, above = _Density([3.0, 5.0]), _Density([0.0, 0.0])
    acq = sampler._compute_acquisition_func(samples, below, above)
    assert acq[0] == pytest.approx(-math.log(0.1 + 0.9 * math.exp(-3)))
    assert acq[1] == pytest.approx(-math.log(0.1 + 0.9 * math.exp(-5)) - math.log(2))
    assert int(np.argmax(acq)) == 0  # the cheaper candidate wins per dollar
    sampler.cost_power = 0.0  # plain TPE: the higher EI wins
    assert int(np.argmax(sampler._compute_acquisition_func(samples, below, above))) == 1


def _ranks_proposed(cost_power: float) -> list[int]:
    """Rank does not change the score; x does. Count which ranks TPE proposes after startup."""
    sampler = CostAwareTPESampler(
        cost_of=lambda hp: float(hp["rank"]), cost_power=cost_power, seed=3, n_startup_trials=6
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def objective(trial):
        trial.suggest_categorical("rank", [4, 64])
        x = trial.suggest_float("x", 0, 1)
        return -((x - 0.3) ** 2)

    study.optimize(objective, n_trials=30)
    if cost_power:
        assert sampler.acquisitions > 0  # the hook into TPESampler is live in this Optuna
    return [t.params["rank"] for t in study.trials[6:]]


def test_cost_aware_search_prefers_cheap_configs_of_equal_promise():
    cheap_share = _ranks_proposed(1.0).count(4) / 24
    plain_share = _ranks_proposed(0.0).count(4) / 24
    assert cheap_share >= 0.8
    assert cheap_share > plain_share


def test_candidates_are_priced_with_the_current_calibration():
    """The sampler's costs follow the ledger's measured timings, read at most once per refresh."""
    from orchestrator.acquisition import CalibratedCost

    reads = []
    timings = {"flops_per_s:full": 1.0}
    now = [0.0]

    def read():
        reads.append(now[0])
        return dict(timings)

    cost = CalibratedCost(
        lambda hp, measured: hp["flops"] / measured["flops_per_s:full"],
        read,
        refresh_s=5.0,
        clock=lambda: now[0],
    )
    assert cost({"flops": 10.0}) == 10.0
    timings["flops_per_s:full"] = 2.0  # a trial reported: full FT runs twice as fast as assumed
    now[0] = 1.0
    assert cost({"flops": 10.0}) == 10.0  # within the refresh interval: no new read
    now[0] = 6.0
    assert cost({"flops": 10.0}) == 5.0
    assert reads == [0.0, 6.0]
