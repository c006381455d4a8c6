"""The spec reference (docs/spec-reference.md) is generated from the pydantic models and current;
every field is described; examples/demo.yaml shows every section; errors point at the reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from orchestrator import spec as S
from orchestrator.errors import SpecError
from orchestrator.spec_reference import DOC_PATH, render

ROOT = Path(__file__).resolve().parent.parent


def _models() -> list[type[BaseModel]]:
    """SweepSpec and every model it nests (Dim included)."""
    seen, todo = [], [S.SweepSpec]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            for kind in [field.annotation, *getattr(field.annotation, "__args__", ())]:
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    todo.append(kind)
    return seen


def test_the_committed_reference_is_current():
    committed = (ROOT / DOC_PATH).read_text(encoding="utf-8")
    assert committed == render(), (
        f"{DOC_PATH} is stale: python -m orchestrator.spec_reference > {DOC_PATH}"
    )


def test_the_module_prints_the_reference():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.spec_reference"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == render()


def test_every_field_has_a_description_and_a_row():
    doc = render()
    models = _models()
    assert S.Dim in models and S.StorageSpec in models and len(models) >= 12
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 8, f"{model.__name__}.{name}"
            assert re.search(rf"\| `([a-z_]+\.)?{name}` \|", doc), f"{model.__name__}.{name}"


def test_the_reference_gives_types_defaults_and_bounds():
    doc = render()
    assert "| `trial.max_steps` | integer (>= 1) | `30` |" in doc
    assert "| `budget_usd` | number | **required** |" in doc
    assert "| `prices.market` | `on_demand` \\| `spot` | `on_demand` |" in doc
    assert "| `search_space.rank` | dimension | `{choices: [4, 8, 16, 32, 64]}` |" in doc
    assert "| `full.target_score` | number or null | `null` |" in doc


def test_the_demo_shows_every_section_and_key():
    text = S.EXAMPLE_SPEC.read_text(encoding="utf-8")
    demo = yaml.safe_load(text)
    assert set(S.SweepSpec.model_fields) == set(demo)  # every top-level key, given
    assert "first_trial" in demo["search_space"]
    for name, field in S.SweepSpec.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for key in model.model_fields:  # given, or commented out with its default
                given = key in (demo[name] or {})
                assert given or re.search(rf"^\s*# {key}:", text, re.M), f"{name}.{key}"


def test_the_demo_keeps_its_sweep():
    """Showing the defaults changed nothing: the demo is the sweep it was."""
    spec = S.load_spec(S.EXAMPLE_SPEC)
    assert (spec.name, spec.budget_usd, spec.max_trials) == ("demo", 0.01, 16)
    assert spec.search_space.rank.choices == [4, 8, 16, 32]
    assert not spec.storage.model_fields_set  # storage: {} leaves --data-dir / LORASWEEP_DATA on
    assert (
        spec.model_dump()
        == S.parse_spec(
            {
                "name": "demo",
                "budget_usd": 0.01,
                "search_space": {"preset": "default", "rank": {"choices": [4, 8, 16, 32]}},
                "trial": {
                    "max_steps": 24,
                    "eval_every": 8,
                    "batch_size": 4,
                    "max_seq_len": 192,
                    "eval_examples": 16,
                    "max_new_tokens": 80,
                },
                "resources": {"accelerator": "cpu", "max_concurrent_trials": 2},
                "max_trials": 16,
                "early_stopping": {"reduction_factor": 2},
            },
            S.EXAMPLE_SPEC.parent,
        ).model_dump()
    )


@pytest.mark.parametrize(
    "raw",
    [
        {"name": "x", "budget_usd": 1, "trial": {"max_stepz": 3}},
        {"budget_usd": 1},
    ],
)
def test_key_errors_point_at_the_reference(raw):
    with pytest.raises(SpecError) as err:
        S.parse_spec(raw)
    assert DOC_PATH in str(err.value) and "examples/demo.yaml" not in str(err.value)
