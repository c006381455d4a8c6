"""``lorasweep validate`` explains the money (issue 22, item 5): the least budget that runs (the
base-model eval, the cheapest trial to its first rung and the watchdog's allowance: what the
ledger admits), what the spec's budget buys, the base eval's cost, the data's row counts and the
resolved trial shape, and a warning when not even one full trial fits. The least budget printed
is the one ``run`` accepts: the same check (``make_plan``) takes it and refuses a hair less."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

LEAST = re.compile(r"least budget that runs: \$([0-9.]+)")


def _spec_file(tmp_path, tiny_model, small_data, budget_usd: float):
    path = tmp_path / f"spec-{budget_usd!r}.yaml"
    spec = {
        "name": "money",
        "budget_usd": budget_usd,
        "model": {"name_or_path": str(tiny_model)},
        "data": {"source": "files", **{k: str(v) for k, v in small_data.items()}},
        "search_space": {"preset": "default", "rank": {"choices": [2, 4]}},
        "trial": {
            "max_steps": 12,
            "eval_every": 4,
            "batch_size": 4,
            "max_seq_len": 160,
            "eval_examples": 4,
            "max_new_tokens": 8,
        },
        "resources": {"accelerator": "cpu", "cpus_per_trial": 1},
        "prices": {"overrides": {"cpu": 36.0}},
        "storage": {"data_dir": str(tmp_path / "data")},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _invoke(*args) -> tuple[int, str]:
    out = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    return out.exit_code, " ".join(out.output.split())


@pytest.fixture(scope="module")
def least(tmp_path_factory, tiny_model, small_data):
    """(the least budget validate prints, its whole output) for a spec with room to spare."""
    tmp = tmp_path_factory.mktemp("money")
    code, out = _invoke("validate", _spec_file(tmp, tiny_model, small_data, 5.0))
    assert code == 0, out
    found = LEAST.search(out)
    assert found, out
    return float(found.group(1)), out


def test_a_budget_of_1_1x_the_least_budget_printed_is_accepted(
    least, tmp_path, tiny_model, small_data
):
    usd, _ = least
    code, out = _invoke("validate", _spec_file(tmp_path, tiny_model, small_data, 1.1 * usd))
    assert code == 0, out


def test_the_least_budget_runs_and_a_hair_less_is_refused_by_run(
    least, tmp_path, tiny_model, small_data
):
    usd, _ = least
    code, out = _invoke("validate", _spec_file(tmp_path, tiny_model, small_data, usd))
    assert code == 0, out
    below = _spec_file(tmp_path, tiny_model, small_data, usd - 1e-6)
    for command in ("validate", "run"):  # run refuses it before anything starts
        code, out = _invoke(command, below)
        assert code == 2, out
        assert "budget_usd" in out and f"at least ${usd:.6f}" in out, out
    assert not (tmp_path / "data").exists()  # nothing ran, no store was made


def test_validate_prints_the_base_eval_rows_shape_and_what_the_budget_buys(least):
    usd, out = least
    base = re.search(r"base-model eval \$([0-9.]+)", out)
    first = re.search(r"cheapest trial to its first rung \$([0-9.]+)", out)
    allowance = re.search(r"watchdog allowance \$([0-9.]+)", out)
    assert base and first and allowance, out
    parts = sum(float(m.group(1)) for m in (base, first, allowance))
    assert usd == pytest.approx(parts, abs=5e-6) and float(base.group(1)) > 0
    assert "data: 48 train, 4 validation, 4 test rows" in out
    for shape in ("12 steps", "eval every 4", "batch 4", "max_seq_len 160", "rank 2|4"):
        assert shape in out, (shape, out)
    bought = re.search(r"\$5 buys about (\d+) trials to the first rung or (\d+) full trials", out)
    assert bought, out
    to_rung, full = int(bought.group(1)), int(bought.group(2))
    # one trial after another, each to its first rung, with the allowance's room kept
    room = 5.0 - float(base.group(1)) - float(allowance.group(1))
    assert to_rung == int(room // float(first.group(1)))
    assert to_rung > full >= 1
    assert "not even one full trial" not in out


def test_a_budget_that_pays_no_full_trial_is_warned(least, tmp_path, tiny_model, small_data):
    usd, _ = least
    code, out = _invoke("validate", _spec_file(tmp_path, tiny_model, small_data, usd))
    assert code == 0, out
    assert "warning: not even one full trial" in out
    assert re.search(r"one full trial needs budget_usd >= \$[0-9.]+", out), out
