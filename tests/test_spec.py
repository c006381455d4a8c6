"""Spec validation, presets and every shipped YAML (pure unit tests, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.errors import SpecError
from orchestrator.spec import (
    EXAMPLE_SPEC,
    PRESETS_DIR,
    SweepSpec,
    load_preset,
    load_spec,
    parse_spec,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_validates(path):
    spec = load_spec(path)
    assert spec.budget_usd > 0
    assert spec.eval_steps[-1] == spec.trial.max_steps


@pytest.mark.parametrize("name", ["light", "medium", "heavy", "default"])
def test_presets_load_and_have_documented_shape(name):
    spec = parse_spec({"name": "x", "budget_usd": 1, "search_space": {"preset": name}})
    space = spec.search_space
    assert space.learning_rate.log and space.learning_rate.low < space.learning_rate.high
    if name != "default":
        rank = {"light": 8, "medium": 16, "heavy": 64}[name]
        assert space.rank.value == rank and space.alpha.value == 2 * rank
    else:
        assert set(space.target_modules.choices) == {"attn", "attn_mlp", "all_linear"}
        assert min(space.rank.choices) == 4 and max(space.rank.choices) == 64


def test_every_preset_file_is_covered():
    assert {p.stem for p in PRESETS_DIR.glob("*.yaml")} == {"light", "medium", "heavy", "default"}
    for p in PRESETS_DIR.glob("*.yaml"):
        assert load_preset(p.stem) == yaml.safe_load(p.read_text())


def test_inline_keys_override_the_preset():
    spec = parse_spec(
        {"name": "x", "budget_usd": 1, "search_space": {"preset": "heavy", "rank": {"value": 32}}}
    )
    assert spec.search_space.rank.value == 32
    assert spec.search_space.target_modules.value == "all_linear"


def test_defaults_are_embedded_and_prior_centred():
    spec = parse_spec({"name": "x", "budget_usd": 5})
    assert spec.model.name_or_path == "embedded" and spec.data.source == "embedded"
    assert spec.search_space.learning_rate.low == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "raw, field, words",
    [
        ({"budget_usd": 1}, "name", "missing"),
        ({"name": "x"}, "budget_usd", "missing"),
        ({"name": "x", "budget_usd": 0}, "budget_usd", "> 0"),
        ({"name": "x", "budget_usd": -3}, "budget_usd", "> 0"),
        ({"name": "x", "budget_usd": 1, "colour": "red"}, "colour", "unknown key"),
        (
            {"name": "x", "budget_usd": 1, "trial": {"max_stepz": 3}},
            "trial.max_stepz",
            "unknown key",
        ),
        (
            {"name": "x", "budget_usd": 1, "search_space": {"preset": "huge"}},
            "search_space.preset",
            "light",
        ),
        (
            {"name": "x", "budget_usd": 1, "search_space": {"rank": {"choices": [0]}}},
            "search_space.rank",
            "integer >= 1",
        ),
        (
            {
                "name": "x",
                "budget_usd": 1,
                "search_space": {"target_modules": {"value": "everything"}},
            },
            "search_space.target_modules",
            "all_linear",
        ),
        (
            {"name": "x", "budget_usd": 1, "trial": {"max_steps": 5, "eval_every": 10}},
            "trial",
            "eval_every",
        ),
        (
            {"name": "x", "budget_usd": 1, "resources": {"accelerator": "H100"}},
            "resources",
            "gpus_per_trial",
        ),
        (
            {"name": "x", "budget_usd": 1, "data": {"source": "files", "train": "a.jsonl"}},
            "data",
            "validation",
        ),
        (
            {"name": "x", "budget_usd": 1, "prices": {"overrides": {"H100": 0}}},
            "prices.overrides",
            "> 0",
        ),
        (
            {"name": "x", "budget_usd": 1, "early_stopping": {"grace_fraction": 0.1}},
            "early_stopping.grace_fraction",
            "0.2",
        ),
    ],
)
def test_bad_specs_name_the_field_and_the_fix(raw, field, words):
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert err.value.field == field
    assert words in str(err.value)


def test_relative_paths_resolve_against_the_spec_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    spec_file = tmp_path / "sub" / "s.yaml"
    spec_file.write_text(
        "name: x\nbudget_usd: 1\ndata: {source: files, train: t.jsonl, "
        "validation: v.jsonl}\nmodel: {name_or_path: ./m}\n"
    )
    spec = load_spec(spec_file)
    assert spec.data.train == tmp_path / "sub" / "t.jsonl"
    assert spec.model.name_or_path == str(tmp_path / "sub" / "m")


def test_missing_spec_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_first_rung_is_at_least_a_fifth_of_the_trial():
    spec = parse_spec(
        {
            "name": "x",
            "budget_usd": 1,
            "trial": {"max_steps": 100, "eval_every": 5},
            "early_stopping": {"grace_fraction": 0.2},
        }
    )
    assert spec.eval_steps[spec.first_rung_reports - 1] == 20
    demo = load_spec(EXAMPLE_SPEC)
    assert demo.eval_steps[demo.first_rung_reports - 1] >= 0.2 * demo.trial.max_steps


def test_spec_round_trips_through_json_dump():
    spec = load_spec(EXAMPLE_SPEC)
    assert SweepSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://bob:s3cret@db:5432/x", "postgresql://bob:***@db:5432/x"),
        ("postgresql+psycopg://bob:p%40ss@db/x", "postgresql+psycopg://bob:***@db/x"),
        ("mysql+pymysql://u:pw@h/x?charset=utf8", "mysql+pymysql://u:***@h/x?charset=utf8"),
        (
            "postgresql://h/db?password=pw&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("http://bob:hunter2@mlflow:5000", "http://bob:***@mlflow:5000"),
        ("https://mlflow.example.com/?token=abc", "https://mlflow.example.com/?token=***"),
        ("sqlite:///lorasweep-data/mlflow.db", "sqlite:///lorasweep-data/mlflow.db"),
        ("postgresql://bob@db/x", "postgresql://bob@db/x"),
        ("weird scheme://a:b@c", "weird scheme://a:***@c"),
        ("lorasweep-data/mlruns", "lorasweep-data/mlruns"),
    ],
)
def test_hide_password(url, shown):
    from orchestrator.secrets import hide_password

    assert hide_password(url) == shown


def test_scrub_hides_a_password_quoted_or_not():
    from orchestrator.secrets import scrub

    url = "postgresql://bob:p%40ss@db/x"
    assert scrub("auth failed for p@ss and p%40ss", url) == "auth failed for *** and ***"
    assert scrub("no secret here", "sqlite:///x.db") == "no secret here"


def test_public_dump_hides_every_storage_password():
    spec = parse_spec(
        {
            "name": "x",
            "budget_usd": 1,
            "storage": {
                "mlflow_tracking_uri": "http://u:mlpw@mlflow:5000",
                "optuna_storage": "postgresql://u:optpw@db/optuna",
                "service_db": "postgresql+psycopg://u:svcpw@db/svc",
            },
        }
    )
    dumped = spec.public_dump()
    text = repr(dumped)
    for secret in ("mlpw", "optpw", "svcpw"):
        assert secret not in text
    assert dumped["storage"]["optuna_storage"] == "postgresql://u:***@db/optuna"
    assert spec.storage.optuna_storage.endswith("u:optpw@db/optuna")  # the spec itself keeps it
    assert {k: v for k, v in dumped.items() if k != "storage"} == {
        k: v for k, v in spec.model_dump(mode="json").items() if k != "storage"
    }


def test_duplicate_keys_in_a_file_and_yaml_merge_keys(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nbudget_usd: 1\nprices:\n  overrides: {cpu: 1, cpu: 2}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.field == "prices.overrides.cpu" and "given twice" in str(err.value)
    # a merge key's values may be overridden next to it: not a duplicate
    path.write_text(
        "name: x\nbudget_usd: 1\ntrial: {<<: {max_steps: 4, eval_every: 2}, max_steps: 6}\n"
    )
    assert load_spec(path).trial.max_steps == 6


def test_spec_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: x\nbudget_usd: 1  # caf\xe9\n")
    with pytest.raises(SpecError, match=r"s.yaml:2 is not UTF-8"):
        load_spec(path)


@pytest.mark.parametrize("name", ["a", "demo-sweep_2.1", "x" * 64])
def test_good_names_pass(name):
    assert parse_spec({"name": name, "budget_usd": 1}).name == name


def test_truncation_defaults_to_refuse_and_generation_fits_max_seq_len():
    assert parse_spec({"name": "x", "budget_usd": 1}).data.truncation == "refuse"
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "x", "budget_usd": 1, "trial": {"max_seq_len": 64}})
    assert err.value.field == "trial" and "max_new_tokens (96) must be < max_seq_len" in str(
        err.value
    )
