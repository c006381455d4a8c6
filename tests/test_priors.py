"""The sweep's first trial: the published priors' config, clamped into the user's space."""

from __future__ import annotations

import math

import optuna
import pytest

from orchestrator.priors import first_config, recommended_lr
from orchestrator.search import DefineByRun
from orchestrator.spec import Dim, SearchSpace, load_preset, parse_spec


def _space(**dims) -> SearchSpace:
    return SearchSpace(**{**load_preset("default"), **dims})


def test_recommended_lr_follows_the_published_anchors():
    # "LoRA Without Regret": best LoRA lr ~3e-4 for 8B+ models, ~1e-3 for 1-4B (within 2x here)
    assert recommended_lr("lora", 4096, "llama", 1000) == pytest.approx(3e-4, rel=0.1)
    for hidden in (2048, 3072):
        assert 5e-4 / 2 <= recommended_lr("lora", hidden, "llama", 1000) <= 1e-3 * 2
    # LoRA ~10x full FT; ~15x for runs under ~100 steps; smaller models take larger rates
    full = recommended_lr("full", 4096, "llama", 1000)
    assert recommended_lr("lora", 4096, "llama", 1000) == pytest.approx(10 * full)
    assert recommended_lr("lora", 4096, "llama", 30) == pytest.approx(15 * full)
    assert recommended_lr("lora", 576, "llama", 30) > recommended_lr("lora", 4096, "llama", 30)
    # Qwen's fit barely depends on width
    assert recommended_lr("lora", 896, "qwen2", 1000) == pytest.approx(
        recommended_lr("lora", 3584, "qwen2", 1000), rel=0.15
    )
    assert recommended_lr("lora", 768, "gpt2", 1000) is None


def test_first_config_of_the_default_space_for_the_demo_model():
    point = first_config(_space(), 576, "llama", 30)  # SmolLM2-135M: hidden 576, 30 steps
    assert point == {
        "learning_rate": pytest.approx(1.98e-3, rel=0.01),
        "rank": 16,
        "target_modules": "all_linear",
    }


def test_first_config_snaps_to_choices_and_clamps_into_ranges():
    space = _space(
        learning_rate=Dim(low=1e-4, high=1e-3, log=True),
        rank=Dim(choices=[2, 4]),
        target_modules=Dim(choices=["qv", "attn"]),
        dropout=Dim(choices=[0.0, 0.2]),
        use_rslora=Dim(choices=[True, False]),
    )
    point = first_config(space, 576, "llama", 30)
    assert point == {
        "learning_rate": pytest.approx(1e-3),  # the range's top: the prior lies above it
        "rank": 4,  # nearest 16
        "target_modules": "attn",  # the most layers offered
        "dropout": 0.0,  # nearest 0.05
        "use_rslora": False,
    }
    levels = [2e-4, 6e-4, 2e-3, 6e-3]
    assert first_config(_space(learning_rate=Dim(choices=levels)), 576, "llama", 30)[
        "learning_rate"
    ] == pytest.approx(2e-3)


def test_first_config_by_method_and_without_a_published_fit():
    qlora = first_config(_space(method=Dim(choices=["full", "qlora"])), 576, "llama", 30)
    assert qlora["method"] == "qlora"
    # full FT: the space's rates are LoRA's, so the full-FT prior is divided by the scale
    full = first_config(_space(method=Dim(choices=["full"]), full_lr_scale=0.1), 576, "llama", 1000)
    assert full["learning_rate"] == pytest.approx(recommended_lr("full", 576, "llama", 1000) / 0.1)
    centre = first_config(_space(), 768, "gpt2", 30)["learning_rate"]
    assert centre == pytest.approx(math.sqrt(1e-4 * 1e-2))
    fixed = first_config(
        _space(learning_rate=Dim(value=1e-3), rank=Dim(value=8), target_modules=Dim(value="qv")),
        576,
        "llama",
        30,
    )
    assert fixed == {}


def test_an_enqueued_first_config_is_the_trial_optuna_runs():
    """The point's names and types are what the define-by-run space suggests (real Optuna)."""
    space = _space(dropout=Dim(low=0.0, high=0.2), use_dora=Dim(choices=[False, True]))
    point = first_config(space, 576, "llama", 30)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(point)
    trial = study.ask()
    DefineByRun(space)(trial)
    assert trial.params == point
    second = study.ask()  # afterwards the sampler proposes
    DefineByRun(space)(second)
    assert second.params != point


def test_the_spec_turns_the_prior_trial_off():
    spec = parse_spec(
        {
            "name": "x",
            "budget_usd": 1,
            "search_space": {"preset": "default", "first_trial": "sampled"},
        }
    )
    assert spec.search_space.first_trial == "sampled"
    assert parse_spec({"name": "x", "budget_usd": 1}).search_space.first_trial == "prior"
