"""Bad input through the real CLI: a message naming the field and the fix, exit code 2, nothing
started (no Ray, no storage folder) and nothing spent."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from workers import demo_task

runner = CliRunner()


def _run(tmp_path, spec: dict):
    spec.setdefault("storage", {"data_dir": str(tmp_path / "store")})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["run", str(path)])
    return result, " ".join(result.output.split())  # rich wraps long lines


def _assert_nothing_started(tmp_path, result):
    import ray

    assert result.exit_code == 2
    assert not ray.is_initialized()
    assert not (tmp_path / "store").exists()
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"budget_usd": 1}, ["name:", "missing", "add it"]),
        ({"name": "x", "budget_usd": 1, "learning_rate": 0.1}, ["learning_rate:", "unknown key"]),
        ({"name": "x", "budget_usd": 0}, ["budget_usd:", "> 0"]),
        ({"name": "x", "budget_usd": -5}, ["budget_usd:", "> 0"]),
        (
            {"name": "x", "budget_usd": 1, "search_space": {"preset": "gigantic"}},
            ["search_space.preset:", "unknown preset 'gigantic'", "light"],
        ),
    ],
)
def test_bad_spec_keys(tmp_path, spec, words):
    result, out = _run(tmp_path, spec)
    _assert_nothing_started(tmp_path, result)
    for w in words:
        assert w in out


def test_missing_data_file(tmp_path):
    result, out = _run(
        tmp_path,
        {
            "name": "x",
            "budget_usd": 1,
            "data": {"source": "files", "train": "nope.jsonl", "validation": "val.jsonl"},
        },
    )
    _assert_nothing_started(tmp_path, result)
    assert "data.train:" in out and "nope.jsonl not found" in out and "fix the path" in out


def test_rows_missing_fields(tmp_path):
    rows = demo_task.make_split("validation")[:3]
    (tmp_path / "train.jsonl").write_text(
        json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "hi", "completion": "yo"}) + "\n"
    )
    (tmp_path / "val.jsonl").write_text(json.dumps(rows[1]) + "\n")
    result, out = _run(
        tmp_path,
        {
            "name": "x",
            "budget_usd": 1,
            "data": {"source": "files", "train": "train.jsonl", "validation": "val.jsonl"},
        },
    )
    _assert_nothing_started(tmp_path, result)
    assert "data.train" in out and "train.jsonl:2" in out and "`messages`" in out


def test_instruction_rows_missing_output(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "say hi"}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    result, out = _run(
        tmp_path,
        {
            "name": "x",
            "budget_usd": 1,
            "data": {
                "source": "files",
                "format": "instruction",
                "train": "train.jsonl",
                "validation": "val.jsonl",
            },
        },
    )
    _assert_nothing_started(tmp_path, result)
    assert "train.jsonl:1" in out and "`output`" in out


def test_missing_model_path(tmp_path):
    result, out = _run(
        tmp_path, {"name": "x", "budget_usd": 1, "model": {"name_or_path": "./no-such-model"}}
    )
    _assert_nothing_started(tmp_path, result)
    assert "model.name_or_path:" in out and "no-such-model" in out and "config.json" in out


def test_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_help_is_fast_and_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("run", "status", "leaderboard", "promote", "generate"):
        assert cmd in result.output
