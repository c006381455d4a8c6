"""A bad JSONL file names every bad row (up to a few), each with its line and its real problem."""

from __future__ import annotations

import json

import pytest

from workers import demo_task
from workers.data import DataError, read_examples

SHOWN = 5  # bad rows listed in one error (workers.data.SHOWN)
GOOD = json.dumps(demo_task.make_split("test")[0])


def _file(tmp_path, lines: list[str]):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _error(path, fmt: str = "chat") -> str:
    with pytest.raises(DataError) as err:
        read_examples(path, fmt, field="data.train")
    return str(err.value)


def test_every_bad_row_is_reported_with_its_line(tmp_path):
    path = _file(
        tmp_path,
        [
            GOOD,
            '{"messages": [{"role": "user", "content": "hi"}]}',
            GOOD,
            "{not json",
            '{"messages": [{"role": "robot", "content": "hi"}, '
            '{"role": "assistant", "content": "x"}]}',
        ],
    )
    text = _error(path)
    assert "3 bad rows" in text
    assert f"{path}:2" in text and f"{path}:4" in text and f"{path}:5" in text
    assert f"{path}:1" not in text and f"{path}:3" not in text
    assert text.startswith("data.train")


def test_messages_without_an_assistant_turn_says_so(tmp_path):
    text = _error(_file(tmp_path, ['{"messages": [{"role": "user", "content": "hi"}]}']))
    assert "no assistant message" in text
    assert "missing field" not in text


def test_messages_that_do_not_end_with_the_answer_say_so(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "and?"},
        ]
    }
    text = _error(_file(tmp_path, [json.dumps(row)]))
    assert "last message" in text and "messages[2]" in text and "user" in text


def test_a_row_without_messages_says_which_keys_it_has(tmp_path):
    text = _error(_file(tmp_path, [json.dumps({"prompt": "a", "completion": "b"})]))
    assert "no `messages`" in text and "'prompt'" in text and "data.format" in text


def test_json_syntax_errors_carry_the_parsers_whole_message(tmp_path):
    line = '{"messages": [{"role": "user", "content": "hi"},]}'
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        whole = str(exc)  # e.g. "Expecting value: line 1 column 49 (char 48)"
    text = _error(_file(tmp_path, [line]))
    assert whole in text and "column" in text


def test_only_the_first_few_bad_rows_are_listed_and_the_rest_counted(tmp_path):
    bad = SHOWN + 7
    text = _error(_file(tmp_path, ["{oops"] * bad), "chat")
    assert f"{bad} bad rows" in text
    assert text.count("not valid JSON") == SHOWN
    assert "7 more" in text


def test_instruction_rows_name_the_missing_field(tmp_path):
    path = _file(tmp_path, [json.dumps({"instruction": "a"}), json.dumps({"output": "b"})])
    text = _error(path, "instruction")
    assert "2 bad rows" in text
    assert "`output`" in text and "`instruction`" in text
