"""``search_space.target_modules``: PEFT-style raw module lists beside the named sets, storage-safe
for Optuna, validated against the model before anything is spent, trained on exactly."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.errors import SpecError
from orchestrator.spec import parse_spec


def _space(target_modules):
    space = {"target_modules": target_modules}
    return parse_spec({"name": "x", "budget_usd": 1, "search_space": space})


def test_a_raw_module_list_is_a_fixed_storage_safe_value():
    spec = _space(["v_proj", "q_proj"])
    value = spec.search_space.target_modules.value
    assert isinstance(value, str)  # an Optuna categorical / MLflow param, not a list
    assert spec.search_space.fixed_values()["target_modules"] == value
    from workers.lora import TARGET_MODULES

    assert sorted(TARGET_MODULES[value]) == ["q_proj", "v_proj"]


def test_raw_lists_and_named_sets_mix_in_choices():
    spec = _space({"choices": [["q_proj", "v_proj"], "attn", ["down_proj"]]})
    choices = spec.search_space.target_modules.choices
    assert all(isinstance(c, str) for c in choices) and "attn" in choices and len(choices) == 3


def test_the_dumped_spec_shows_the_list_and_parses_back_the_same():
    spec = _space({"choices": [["q_proj", "v_proj"], "attn"]})
    dumped = spec.public_dump()["search_space"]["target_modules"]
    assert dumped["choices"] == [["q_proj", "v_proj"], "attn"]
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.public_dump())))
    assert again.search_space == spec.search_space


@pytest.mark.parametrize(
    "bad, words",
    [
        ([], "at least one module"),
        (["q_proj", "q proj"], "'q proj'"),
        ({"choices": ["attn", "everything"]}, "everything"),
        ([3], "module names"),
    ],
)
def test_malformed_target_modules_are_refused_naming_the_field(bad, words):
    with pytest.raises(SpecError) as err:
        _space(bad)
    assert "search_space.target_modules" in str(err.value) and words in str(err.value)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def test_modules_the_model_lacks_are_refused_naming_them_and_what_it_has(tiny):
    from orchestrator.targets import check_target_modules

    spec = _space({"choices": [["q_proj", "wq"], "attn"]})
    with pytest.raises(SpecError) as err:
        check_target_modules(spec.search_space, tiny)
    text = str(err.value)
    assert text.startswith("search_space.target_modules")
    assert "no module 'wq' (of [q_proj, wq])" in text  # q_proj is there: not named as missing
    assert "{choices: ['attn']}" in text  # the fix keeps what the model has
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in text  # the model's linear modules, to pick from
    assert "lm_head" not in text  # the output head is not a LoRA target


def test_modules_the_model_has_pass(tiny):
    from orchestrator.targets import check_target_modules

    spec = _space({"choices": [["q_proj", "v_proj"], "attn", "all_linear"]})
    check_target_modules(spec.search_space, tiny)  # raises nothing


def test_linear_module_names_are_the_models_own(tiny):
    from workers.lora import linear_module_names

    assert linear_module_names(tiny) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_a_raw_list_adapts_exactly_those_modules(tiny_model):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from workers.lora import attach_lora

    key = _space(["q_proj", "v_proj"]).search_space.target_modules.value
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = attach_lora(base, rank=4, alpha=8, target_modules=key, dropout=0.0)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("q_proj" in n or "v_proj" in n) for n in trainable)


def test_a_trial_on_a_raw_list_trains_and_scores(trial_config):
    from workers.train import run_trial

    key = _space(["q_proj", "v_proj"]).search_space.target_modules.value
    reports: list[dict] = []
    final = run_trial(trial_config(target_modules=key, max_steps=2), lambda m, d: reports.append(m))
    assert final["status"] == "completed" and reports[-1]["step"] == 2
    assert reports[-1]["train_loss_steps"] and reports[-1]["score"] >= 0


def test_optuna_proposes_raw_lists_as_strings():
    import optuna

    from orchestrator.search import DefineByRun

    space = _space({"choices": [["q_proj", "v_proj"], "attn"]}).search_space
    study = optuna.create_study(storage="sqlite:///:memory:")
    seen = set()
    for _ in range(8):
        trial = study.ask()
        DefineByRun(space)(trial)
        seen.add(trial.params["target_modules"])
        study.tell(trial, 0.5)
    assert seen <= set(space.target_modules.choices) and all(isinstance(s, str) for s in seen)
