"""The search ends when the cheapest next trial does not fit, and says so in figures that add up
(a real ledger actor on local Ray; Tune's Searcher base class, no Optuna study needed: the inner
searcher is never asked once the cap refuses)."""

from __future__ import annotations

from orchestrator.budget import Ledger
from orchestrator.search import BudgetedSearcher, Prediction


class _NeverAsked:
    metric, mode = "score", "max"

    def suggest(self, trial_id):  # pragma: no cover - the cap refuses first
        raise AssertionError("the inner searcher must not be asked")


def test_an_exhausted_budget_names_the_floor_the_allowance_and_what_is_left(ray_local):
    import ray
    from ray.tune.search import Searcher

    ledger = ray.remote(Ledger).options(num_cpus=0).remote(0.01, allowance_usd=0.002)
    try:
        assert ray.get(ledger.reserve.remote("spent", 0.0075))
        ray.get(ledger.settle.remote("spent", 0.0075))  # $0.0025 left
        floor_usd = 0.000800
        predict = lambda config: Prediction(  # noqa: E731
            admission_usd=floor_usd, trial_usd=0.002, step_s=1.0, closing_s=1.0, startup_s=1.0
        )
        searcher = BudgetedSearcher(_NeverAsked(), ledger, predict, cheapest={})
        assert searcher.suggest("t1") == Searcher.FINISHED
    finally:
        ray.kill(ledger)
    reason = searcher.exhausted_reason
    # $0.0008 + $0.002 allowance > $0.0025 left: the figures say why, to the millionth
    assert "$0.000800 to reach its first rung + $0.002000 watchdog allowance" in reason
    assert "$0.002500 is left unspent" in reason
