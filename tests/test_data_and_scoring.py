"""The demo task, data reading and the field-accuracy score (pure unit tests)."""

from __future__ import annotations

import json

import pytest

from workers import demo_task
from workers.data import (
    DataError,
    Example,
    check_room,
    encode_for_training,
    encode_prompt,
    read_examples,
)
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


def test_rows_keep_their_line_and_a_bom_is_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    row = json.dumps(demo_task.make_split("test")[0]).encode()
    path.write_bytes(b"\xef\xbb\xbf" + row + b"\n\n" + row + b"\n")
    assert [ex.line for ex in read_examples(path)] == [1, 3]


def test_non_utf8_row_names_file_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    row = json.dumps({"instruction": "a", "output": "b"}).encode()
    path.write_bytes(row + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError) as err:
        read_examples(path, "instruction", "data.train")
    assert f"data.train ({path}:2)" in str(err.value)
    assert "not UTF-8" in str(err.value) and "byte 0xe9 at column 21" in str(err.value)


class _WordTokenizer:
    """One token per word: lengths a test can count by eye."""

    chat_template = None
    eos_token = " <eos>"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(w) for w in text.split()]}


def _example(prompt_words: int, answer_words: int, line: int = 1) -> Example:
    prompt = " ".join(f"p{i}" for i in range(prompt_words))
    return Example([{"role": "user", "content": prompt}], " ".join(["a"] * answer_words), line)


def test_left_truncation_keeps_the_whole_answer():
    tok, ex = _WordTokenizer(), _example(20, 5)  # prompt: "user:" + 20 words + "assistant:"
    full_prompt = encode_prompt(tok, ex)
    assert len(full_prompt) == 22
    ids, labels = encode_for_training(tok, ex, 16, "left")
    assert len(ids) == 16 and ids[-6:] == [1] * 5 + [5]  # the answer and its <eos>
    assert labels == [-100] * 10 + [1] * 5 + [5] and ids[:10] == full_prompt[-10:]
    # the default keeps today's behaviour: the end is cut
    ids, labels = encode_for_training(tok, ex, 16)
    assert ids == full_prompt[:16] and labels == [-100] * 16
    # an answer that leaves no room for a prompt token: cut at the end as before
    assert encode_for_training(tok, _example(3, 20), 16, "left")[0][:5] == encode_prompt(
        tok, _example(3, 20)
    )
    assert encode_prompt(tok, ex, 8, "left") == full_prompt[-8:]
    assert encode_prompt(tok, ex, 8) == full_prompt


def test_check_room_refuses_or_lets_left_truncation_through(tmp_path):
    tok, path = _WordTokenizer(), tmp_path / "t.jsonl"
    rows = [_example(2, 2, line=1), _example(30, 5, line=7)]
    with pytest.raises(DataError) as err:
        check_room(tok, rows, "data.train", path, 32)
    assert f"data.train ({path}:7)" in str(err.value) and "data.truncation: left" in str(err.value)
    assert check_room(tok, rows, "data.train", path, 32, "left") == [7, 32]
    with pytest.raises(DataError, match="the answer alone is 33 tokens"):
        check_room(tok, [_example(1, 32, line=2)], "data.train", path, 32, "left")
    # validation rows: prompt + max_new_tokens must fit
    with pytest.raises(DataError, match="trial.max_new_tokens 20"):
        check_room(tok, rows[:1] + [_example(11, 1, 3)], "data.validation", path, 32, new_tokens=20)
    assert check_room(tok, [_example(11, 1, 3)], "data.validation", path, 32, "left", 20) == [32]
