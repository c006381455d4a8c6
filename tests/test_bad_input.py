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


# --- issue 16: bad input refused before anything is spent, by `validate` and by `run` ----------

COMMANDS = ["validate", "run"]
NAN, INF = float("nan"), float("inf")


def _invoke(tmp_path, command: str, text: str):
    """``lorasweep COMMAND`` on a spec given as YAML text; returns (result, one-line output)."""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    result = runner.invoke(app, [command, str(path)])
    return result, " ".join(result.output.split())


def _spec(tmp_path, **keys) -> dict:
    spec = {"name": "x", "budget_usd": 1, "storage": {"data_dir": str(tmp_path / "store")}}
    spec.update(keys)
    return spec


def _refused(tmp_path, command: str, spec: dict | str, *words: str) -> str:
    text = spec if isinstance(spec, str) else yaml.safe_dump(spec)
    result, out = _invoke(tmp_path, command, text)
    _assert_nothing_started(tmp_path, result)
    for w in words:
        assert w in out, out
    return out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "keys, field",
    [
        ({"budget_usd": NAN}, "budget_usd:"),
        ({"budget_usd": INF}, "budget_usd:"),
        ({"search_space": {"learning_rate": NAN}}, "search_space.learning_rate"),
        ({"search_space": {"learning_rate": {"low": NAN, "high": 0.01}}}, "learning_rate.low"),
        ({"search_space": {"learning_rate": {"low": 1e-4, "high": INF}}}, "learning_rate.high"),
        ({"search_space": {"learning_rate": {"choices": [1e-3, NAN]}}}, "learning_rate"),
        ({"search_space": {"alpha": {"value": INF}}}, "search_space.alpha"),
        ({"search_space": {"loraplus_lr_ratio": NAN}}, "search_space.loraplus_lr_ratio"),
        ({"search_space": {"dropout": {"choices": [0.0, NAN]}}}, "search_space.dropout"),
        ({"prices": {"overrides": {"cpu": NAN}}}, "prices.overrides.cpu"),
        ({"prices": {"overrides": {"H100": INF}}}, "prices.overrides.H100"),
        ({"full": {"learning_rate": {"low": NAN, "high": 1e-3}}}, "full.learning_rate.low"),
        ({"full": {"max_runs": 1, "target_score": NAN}}, "full.target_score"),
    ],
)
def test_nan_and_inf_are_refused(tmp_path, command, keys, field):
    _refused(tmp_path, command, _spec(tmp_path, **keys), field, "finite")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "keys, field",
    [
        ({"budget_usd": True}, "budget_usd:"),
        ({"max_trials": True}, "max_trials:"),
        ({"trial": {"max_steps": True}}, "trial.max_steps:"),
        ({"search_space": {"rank": True}}, "search_space.rank:"),
        ({"search_space": {"rank": {"choices": [8, True]}}}, "search_space.rank:"),
        ({"search_space": {"learning_rate": {"low": True, "high": 2}}}, "learning_rate.low:"),
        ({"search_space": {"learning_rate": True}}, "search_space.learning_rate:"),
        ({"search_space": {"alpha": False}}, "search_space.alpha:"),
        ({"prices": {"overrides": {"cpu": True}}}, "prices.overrides.cpu:"),
        ({"full": {"max_runs": 1, "target_score": True}}, "full.target_score:"),
    ],
)
def test_booleans_where_numbers_go_are_refused(tmp_path, command, keys, field):
    _refused(tmp_path, command, _spec(tmp_path, **keys), field, "true/false")


@pytest.mark.parametrize("command", COMMANDS)
def test_yaml_yes_is_not_a_budget(tmp_path, command):
    text = f"name: x\nbudget_usd: yes\nstorage: {{data_dir: {tmp_path / 'store'}}}\n"
    _refused(tmp_path, command, text, "budget_usd:", "true/false", "budget_usd: 20")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "text, words",
    [
        ("name: x\nname: y\nbudget_usd: 1\n", ["name: given twice", "lines 1 and 2"]),
        (
            "name: x\nbudget_usd: 1\ntrial:\n  max_steps: 4\n  eval_every: 2\n  max_steps: 6\n",
            ["trial.max_steps: given twice", "lines 4 and 6"],
        ),
        (
            "name: x\nbudget_usd: 1\nsearch_space:\n  rank: {value: 8, value: 16}\n",
            ["search_space.rank.value: given twice"],
        ),
    ],
)
def test_duplicate_yaml_keys_are_refused(tmp_path, command, text, words):
    text += f"storage: {{data_dir: {tmp_path / 'store'}}}\n"
    _refused(tmp_path, command, text, *words, "keep one")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["x" * 65, "my sweep", "a/../b", "x;drop table", "-x", "é"])
def test_unsafe_or_long_names_are_refused(tmp_path, command, name):
    _refused(tmp_path, command, _spec(tmp_path, name=name), "name:", "64", "letters", "digits")


def _files(tmp_path, train: list, val: list | None = None, **data) -> dict:
    """A data section on JSONL files written from ``train`` / ``val`` rows (dicts or bytes)."""

    def write(path, rows):
        path.write_bytes(
            b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows)
        )

    val = val if val is not None else demo_task.make_split("validation")[:4]
    write(tmp_path / "train.jsonl", train)
    write(tmp_path / "val.jsonl", val)
    return {"source": "files", "train": "train.jsonl", "validation": "val.jsonl", **data}


@pytest.mark.parametrize("command", COMMANDS)
def test_non_utf8_data_names_file_and_line(tmp_path, command):
    rows = demo_task.make_split("train")[:3]
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    data = _files(tmp_path, [rows[0], rows[1], bad, rows[2]])
    _refused(tmp_path, command, _spec(tmp_path, data=data), "data.train", "train.jsonl:3", "UTF-8")


def _long_prompt_row(words: int = 400) -> dict:
    row = demo_task.make_split("train")[0]
    msgs = [dict(m) for m in row["messages"]]
    msgs[-2]["content"] = " ".join(["listing"] * words) + " " + msgs[-2]["content"]
    return {"messages": msgs}


@pytest.mark.parametrize("command", COMMANDS)
def test_train_row_without_room_for_its_answer_is_refused(tmp_path, command):
    rows = demo_task.make_split("train")[:80]
    rows[70] = _long_prompt_row()  # beyond the first 64 rows
    data = _files(tmp_path, rows)
    out = _refused(
        tmp_path,
        command,
        _spec(tmp_path, data=data),
        "data.train",
        "train.jsonl:71",
        "trial.max_seq_len",
        "data.truncation: left",
    )
    assert "train.jsonl:1 " not in out


def test_left_truncation_lets_long_prompts_through_validate(tmp_path):
    rows = demo_task.make_split("train")[:8]
    rows[3] = _long_prompt_row()
    data = _files(tmp_path, rows, truncation="left")
    result, out = _invoke(tmp_path, "validate", yaml.safe_dump(_spec(tmp_path, data=data)))
    assert result.exit_code == 0, out
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_answer_longer_than_max_seq_len_is_refused_even_with_left(tmp_path, command):
    rows = demo_task.make_split("train")[:4]
    msgs = [dict(m) for m in rows[1]["messages"]]
    msgs[-1]["content"] = " ".join(["word"] * 400)
    rows[1] = {"messages": msgs}
    data = _files(tmp_path, rows, truncation="left")
    _refused(
        tmp_path,
        command,
        _spec(tmp_path, data=data),
        "data.train",
        "train.jsonl:2",
        "raise trial.max_seq_len",
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_eval_row_without_room_to_generate_is_refused(tmp_path, command):
    val = demo_task.make_split("validation")[:4]
    val[2] = _long_prompt_row(150)
    data = _files(tmp_path, demo_task.make_split("train")[:8], val)
    spec = _spec(tmp_path, data=data, trial={"max_seq_len": 192, "max_new_tokens": 80})
    _refused(
        tmp_path,
        command,
        spec,
        "data.validation",
        "val.jsonl:3",
        "trial.max_new_tokens",
        "data.truncation: left",
    )
    data["truncation"] = "left"
    result, out = _invoke(tmp_path, "validate", yaml.safe_dump(spec))
    assert result.exit_code == 0, out


def _gpt2_folder(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, bos_token_id=0)
    config.eos_token_id = 0
    config.save_pretrained(tmp_path / "gpt2")
    return str(tmp_path / "gpt2")


@pytest.mark.parametrize("command", COMMANDS)
def test_target_modules_the_model_lacks_are_refused(tmp_path, command):
    model = {"name_or_path": _gpt2_folder(tmp_path)}
    out = _refused(
        tmp_path,
        command,
        _spec(tmp_path, model=model),  # the default preset proposes attn, attn_mlp, all_linear
        "search_space.target_modules:",
        "'attn'",
        "{choices: ['all_linear']}",
    )
    assert "Traceback" not in out
    spec = _spec(tmp_path, model=model, search_space={"target_modules": {"value": "qv"}})
    _refused(tmp_path, command, spec, "search_space.target_modules:", "'qv'", "all_linear")


def test_embedded_model_has_every_target_set():
    from orchestrator.preflight import available_target_sets
    from orchestrator.spec import TARGET_MODULE_SETS
    from workers.model import check_loadable

    assert available_target_sets(check_loadable("embedded")) == list(TARGET_MODULE_SETS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "key, url, words",
    [
        ("optuna_storage", "postgresql://nobody@127.0.0.1:1/x", ["cannot connect"]),
        ("service_db", "postgresql://bob:s3cret@127.0.0.1:1/x", ["cannot connect", "bob:***@"]),
        ("service_db", "nosuchdb://host/x", ["nosuchdb"]),
        ("optuna_storage", "not a url", ["SQLAlchemy URL"]),
        ("mlflow_tracking_uri", "ftp://example.com/x", ["ftp"]),
        ("mlflow_tracking_uri", "http://bob:hunter2@127.0.0.1:1", ["cannot reach", "bob:***@"]),
        ("mlflow_tracking_uri", "postgresql://u:pw99@127.0.0.1:1/m", ["cannot connect"]),
    ],
)
def test_bad_storage_urls_are_refused_without_their_passwords(tmp_path, command, key, url, words):
    spec = _spec(tmp_path)
    spec["storage"][key] = url
    out = _refused(tmp_path, command, spec, f"storage.{key}:", *words)
    for secret in ("s3cret", "hunter2", "pw99"):
        assert secret not in out


@pytest.mark.parametrize("command", COMMANDS)
def test_sqlite_in_an_unwritable_place_is_refused(tmp_path, command):
    (tmp_path / "afile").write_text("")
    spec = _spec(tmp_path)
    spec["storage"]["service_db"] = f"sqlite:///{tmp_path / 'afile' / 'x.db'}"
    _refused(tmp_path, command, spec, "storage.service_db:", "afile", "folder")
    (tmp_path / "junk.db").write_text("this is not a database" * 100)
    spec["storage"]["service_db"] = f"sqlite:///{tmp_path / 'junk.db'}"
    _refused(tmp_path, command, spec, "storage.service_db:", "junk.db", "not a database")


def test_validate_with_embedded_storage_creates_nothing(tmp_path):
    result, out = _invoke(tmp_path, "validate", yaml.safe_dump(_spec(tmp_path)))
    assert result.exit_code == 0, out
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_data_dir_that_is_a_file_is_refused(tmp_path, command):
    (tmp_path / "afile").write_text("")
    spec = _spec(tmp_path)
    spec["storage"]["data_dir"] = str(tmp_path / "afile" / "store")
    _refused(tmp_path, command, spec, "storage.data_dir:", "afile is a file, not a folder")
