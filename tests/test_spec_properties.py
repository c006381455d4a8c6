"""The spec parser on random input (hypothesis): whatever YAML a user writes, ``load_spec`` either
returns a spec or raises ``SpecError`` naming a field; never another exception, never a traceback
for the CLI to print (issue 16)."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import SpecError
from orchestrator.spec import load_spec

SECTIONS = {
    "objective": ["metric", "mode"],
    "model": ["name_or_path", "dtype"],
    "data": ["source", "train", "validation", "format", "truncation"],
    "search_space": ["preset", "learning_rate", "rank", "alpha", "target_modules", "dropout"],
    "trial": ["max_steps", "eval_every", "batch_size", "max_seq_len", "eval_examples"],
    "resources": ["accelerator", "gpus_per_trial", "cpus_per_trial", "max_concurrent_trials"],
    "early_stopping": ["enabled", "grace_fraction", "reduction_factor"],
    "full": ["max_runs", "gate", "target_score", "learning_rate"],
    "prices": ["market", "overrides"],
    "storage": ["data_dir", "mlflow_tracking_uri", "service_db"],
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["lora", "qlora", "full", "cpu", "H100", "default", "score", "max", "left"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["value", "choices", "low", "high", "log", "x", "H100"]),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=6,
)


@st.composite
def specs(draw) -> dict:
    out = {}
    if draw(st.booleans()):
        out["name"] = draw(st.one_of(st.text(max_size=80), st.sampled_from(["demo", "a.b-c"])))
    if draw(st.booleans()):
        out["budget_usd"] = draw(values)
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=3, unique=True)):
        keys = draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=3, unique=True))
        out[section] = draw(st.one_of(values, st.fixed_dictionaries({k: values for k in keys})))
    return out


def _check(path) -> None:
    try:
        load_spec(path)
    except SpecError as exc:
        assert exc.field and str(exc).startswith(exc.field)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=specs())
def test_random_specs_give_a_spec_or_a_spec_error(raw, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    _check(path)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=st.sampled_from(list("ab: -[]{},\n\t'\"&*!|>%@`#1.5")), max_size=60))
def test_random_yaml_text_gives_a_spec_or_a_spec_error(text, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    _check(path)
