"""Cost-aware search: TPE's expected improvement per dollar.

TPE (Bergstra et al., 2011) splits the trials seen so far into the best fraction ``gamma`` and the
rest, fits densities ``l(x)`` (good) and ``g(x)`` (rest), draws candidates from ``l`` and keeps
the one with the highest expected improvement, which under TPE's model is

    EI(x)  proportional to  1 / (gamma + (1 - gamma) * g(x) / l(x)).

Where configs differ a lot in cost (full FT vs LoRA, rank 64 vs rank 4 on a large model), the
best use of a fixed budget is the highest EI per dollar, so this sampler ranks the candidates by

    log EI(x) - cost_power * log(cost(x) / cheapest candidate's cost)

with ``cost(x)`` the cost model's predicted seconds for the whole trial (any monotone proxy of
dollars works: the price per second is the same for every trial of a sweep), priced with the
sweep's current calibration (``CalibratedCost``): measured FLOP/s per method once trials report.
``cost_power`` 0 is plain TPE; 1 is EI per dollar. Joint candidates need ``multivariate=True``
(set here), so the whole config, and so its cost, is known when the candidates are compared.

It hooks into Optuna's ``TPESampler`` at two private methods, ``_sample`` (to learn the search
space and gamma) and ``_compute_acquisition_func`` (to rank the candidates), and reads its
``_gamma``: the Optuna minor range pinned in ``pyproject.toml`` is the one this was written and
tested against (``tests/test_acquisition.py`` fails if the hook stops being called). Where the
installed Optuna's methods differ from the signatures this was written for (:func:`hook_problem`,
checked when a sampler is made), the sampler is plain TPE and warns once (``CostAwareFallback``).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable

import numpy as np
import optuna
from optuna.samplers import TPESampler
from optuna.trial import TrialState

# the private TPESampler methods hooked, with the parameters this was written for (Optuna 5.0)
HOOKED = {
    "_sample": ("self", "study", "trial", "search_space"),
    "_compute_acquisition_func": ("self", "samples", "mpe_below", "mpe_above"),
}


class CostAwareFallback(UserWarning):
    """The installed Optuna's TPESampler no longer has the hooks: the search is plain TPE."""


def hook_problem(sampler_class: type = TPESampler) -> str | None:
    """Why the hooks do not fit ``sampler_class`` (a method gone or its parameters changed), or
    None when they fit."""
    for name, params in HOOKED.items():
        method = getattr(sampler_class, name, None)
        if method is None:
            return f"TPESampler.{name} is gone"
        try:
            found = tuple(inspect.signature(method).parameters)
        except (TypeError, ValueError):
            return f"TPESampler.{name} has no readable signature"
        if found != params:
            return f"TPESampler.{name}{found} is not {name}{params}"
    return None


class CostAwareTPESampler(TPESampler):
    """TPE whose candidates are ranked by expected improvement per dollar (see the module); plain
    TPE, with a :class:`CostAwareFallback` warning, where the installed Optuna's hooks differ."""

    def __init__(
        self,
        cost_of: Callable[[dict], float],
        cost_power: float = 1.0,
        fixed: dict | None = None,
        **tpe_kwargs,
    ) -> None:
        tpe_kwargs.setdefault("multivariate", True)
        tpe_kwargs.setdefault("group", True)
        with warnings.catch_warnings():  # `group` is marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(**tpe_kwargs)
        self.cost_of = cost_of
        self.cost_power = cost_power
        self.fixed = dict(fixed or {})  # hyperparameters the space fixes (part of every config)
        self.acquisitions = 0  # how many times candidates were ranked (tests read it)
        self._space: dict = {}
        self._gamma_fraction = 0.1
        self.fallback = hook_problem(TPESampler) or (
            None if hasattr(self, "_gamma") else "TPESampler._gamma is gone"
        )
        if self.fallback:
            warnings.warn(
                f"cost-aware search is off, plain TPE instead: {self.fallback} in Optuna "
                f"{optuna.__version__} (lorasweep's hook was written for the range pinned in "
                "its pyproject.toml); install that Optuna to rank candidates per dollar",
                CostAwareFallback,
                stacklevel=2,
            )

    def _sample(self, *args, **kwargs):
        if self.fallback:  # the methods changed: pass everything through untouched
            return super()._sample(*args, **kwargs)
        return self._cost_aware_sample(*args, **kwargs)

    def _cost_aware_sample(self, study, trial, search_space):
        self._space = search_space
        n = len(study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        gamma = self._gamma or (lambda k: min(int(np.ceil(0.1 * k)), 25))
        self._gamma_fraction = min(max(gamma(n) / max(n, 1), 1e-3), 1.0)
        return super()._sample(study, trial, search_space)

    def _compute_acquisition_func(self, *args, **kwargs) -> np.ndarray:
        if self.fallback:
            return super()._compute_acquisition_func(*args, **kwargs)
        return self._ei_per_dollar(*args, **kwargs)

    def _ei_per_dollar(self, samples, mpe_below, mpe_above) -> np.ndarray:
        log_ratio = mpe_below.log_pdf(samples) - mpe_above.log_pdf(samples)  # log l(x)/g(x)
        g = self._gamma_fraction
        log_ei = -np.logaddexp(np.log(g), np.log1p(-g) - log_ratio) if g < 1 else log_ratio
        if self.cost_power == 0 or not self._space:
            return log_ei
        self.acquisitions += 1
        size = next(iter(samples.values())).size
        costs = np.array([self.cost_of(self._config(samples, i)) for i in range(size)])
        costs = np.maximum(costs, 1e-12)
        return log_ei - self.cost_power * np.log(costs / costs.min())

    def _config(self, samples: dict, i: int) -> dict:
        out = dict(self.fixed)
        for name, dist in self._space.items():
            if name in samples:
                out[name] = dist.to_external_repr(samples[name][i])
        return out


class CalibratedCost:
    """``cost_of`` for the sampler: a trial's predicted seconds under the sweep's measured
    timings, read through ``timings()`` (the ledger) at most once per ``refresh_s``, since one
    suggestion prices dozens of candidates."""

    def __init__(
        self,
        seconds: Callable[..., float],
        timings: Callable[[], dict],
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seconds = seconds
        self._timings = timings
        self._refresh_s = refresh_s
        self._clock = clock
        self._measured: dict = {}
        self._read_at: float | None = None

    def __call__(self, hp: dict) -> float:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._refresh_s:
            self._measured, self._read_at = dict(self._timings()), now
        return self._seconds(hp, measured=self._measured)
