"""A config that ran out of memory is not proposed again at that size (issue 17): the searcher
makes the next proposal of that size smaller, or skips it, and remembers across a resume."""

from __future__ import annotations

import pytest

from orchestrator.memory_lessons import MemoryLessons, is_out_of_memory

OOM = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
BIG = {"method": "lora", "target_modules": "all_linear", "rank": 64}


def test_only_out_of_memory_failures_are_learned():
    lessons = MemoryLessons(batch_size=8)
    assert not lessons.learn(BIG, "NonFiniteLoss: loss is nan at step 3: the trial failed")
    assert lessons.adjust(BIG) == ({}, None)
    assert lessons.learn(BIG, OOM)
    assert is_out_of_memory("MemoryError: ") and not is_out_of_memory(None)


def test_a_size_that_failed_is_made_smaller_then_skipped():
    lessons = MemoryLessons(batch_size=8)
    lessons.learn(BIG, OOM)
    assert lessons.adjust(BIG) == ({"gradient_checkpointing": True}, None)
    assert lessons.adjust({**BIG, "rank": 128})[0] == {"gradient_checkpointing": True}
    # smaller ranks and other targets never failed: proposed as they are
    assert lessons.adjust({**BIG, "rank": 32}) == ({}, None)
    assert lessons.adjust({**BIG, "target_modules": "attn"}) == ({}, None)
    # the smaller size fails too: half the micro-batch next, down to 1, then a skip
    lessons.learn({**BIG, "gradient_checkpointing": True}, OOM)
    assert lessons.adjust(BIG)[0] == {"gradient_checkpointing": True, "micro_batch": 4}
    for micro in (4, 2, 1):
        lessons.learn({**BIG, "gradient_checkpointing": True, "micro_batch": micro}, OOM)
    updates, reason = lessons.adjust(BIG)
    assert updates == {} and reason.startswith("memory: lora r64 all_linear ran out of memory")
    assert "micro-batch 1 with gradient checkpointing" in reason


def test_lessons_survive_the_searchers_saved_state(ray_local):
    """Through the real searcher: a trial reported failed for memory; the same config proposed
    again gets gradient checkpointing; a resumed sweep's searcher restores the lesson."""
    import ray
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.budget import Ledger
    from orchestrator.search import BudgetedSearcher, DefineByRun, Prediction
    from orchestrator.spec import SearchSpace

    space = SearchSpace.model_validate(
        {
            "method": {"value": "lora"},
            "rank": {"value": 64},
            "target_modules": {"value": "all_linear"},
        }
    )
    ledger = ray.remote(Ledger).remote(1.0)

    def searcher() -> BudgetedSearcher:
        inner = OptunaSearch(space=DefineByRun(space), metric="score", mode="max")
        return BudgetedSearcher(
            inner,
            ledger,
            lambda config: Prediction(0.01, 0.02, 0.1, 1.0),
            {"method": "lora", "rank": 64, "target_modules": "all_linear"},
            lessons=MemoryLessons(batch_size=8),
        )

    first = searcher()
    config = first.suggest("t1")
    assert "gradient_checkpointing" not in config
    first.on_trial_complete("t1", {"trial_status": "failed", "error": OOM})
    again = first.suggest("t2")
    assert again["gradient_checkpointing"] is True
    resumed = searcher()
    resumed.set_state(first.get_state())
    assert resumed.suggest("t3")["gradient_checkpointing"] is True
    ray.get(ledger.settle.remote("t2", 0.0))
    ray.get(ledger.settle.remote("t3", 0.0))


@pytest.mark.parametrize("error", [OOM, "RuntimeError: CUDA error: out of memory"])
def test_cuda_messages_are_out_of_memory(error):
    assert is_out_of_memory(error)
