"""The demo task, data reading and the field-accuracy score (pure unit tests)."""

from __future__ import annotations

import json

import pytest

from workers import demo_task
from workers.data import DataError, read_examples
from workers.evaluate import field_scores, score


@pytest.mark.parametrize("split", sorted(demo_task.SPLIT_SIZES))
def test_shipped_demo_data_is_what_the_generator_makes(split):
    shipped = [json.loads(line) for line in demo_task.split_path(split).read_text().splitlines()]
    assert shipped == demo_task.make_split(split)
    assert len(shipped) == demo_task.SPLIT_SIZES[split]


def test_demo_splits_do_not_overlap_and_are_varied():
    texts = {
        s: {r["messages"][1]["content"] for r in demo_task.make_split(s)}
        for s in demo_task.SPLIT_SIZES
    }
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    records = [json.loads(r["messages"][2]["content"]) for r in demo_task.make_split("train")]
    assert {"property_type", "city", "beds", "baths", "sqft", "price_usd", "features"} == set(
        records[0]
    )
    assert len({len(r["features"]) for r in records}) >= 3
    assert len({r["property_type"] for r in records}) == 4


def test_field_scores_count_each_field():
    ref = '{"city":"Reno","beds":2,"baths":1.5,"features":["pool","garage"]}'
    assert field_scores(ref, ref) == (4, 4)
    # lists compare as multisets; numbers numerically; one wrong field
    assert field_scores(
        'x {"city":"Reno","beds":2.0,"baths":2,"features":["garage","pool"]} y', ref
    ) == (3, 4)
    assert field_scores("not json", ref) == (0, 4)
    assert field_scores('{"city": "Reno"', ref) == (0, 4)
    assert field_scores(" hello ", "hello") == (1, 1)


def test_score_is_field_accuracy_over_all_examples():
    refs = ['{"a":1,"b":2}', '{"a":1,"b":2}']
    assert score(['{"a":1,"b":2}', '{"a":1,"b":3}'], refs) == pytest.approx(0.75)


def test_read_chat_and_instruction_rows(tmp_path):
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps(demo_task.make_split("test")[0]) + "\n\n")
    [ex] = read_examples(chat)
    assert ex.prompt[0]["role"] == "system" and ex.answer.startswith("{")
    inst = tmp_path / "i.jsonl"
    inst.write_text(json.dumps({"instruction": "Add", "input": "1+1", "output": "2"}) + "\n")
    [ex] = read_examples(inst, "instruction")
    assert ex.prompt == [{"role": "user", "content": "Add\n\n1+1"}] and ex.answer == "2"


@pytest.mark.parametrize(
    "line, words",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "`messages`"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
            "role `assistant`",
        ),
        (
            '{"messages": [{"role": "robot", "content": "hi"}, '
            '{"role": "assistant", "content": "x"}]}',
            "messages[0]",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, words):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(demo_task.make_split("test")[0]) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_examples(path, field="data.validation")
    assert f"data.validation ({path}:2)" in str(err.value) and words in str(err.value)
