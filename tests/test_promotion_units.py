"""Promotion's pure parts, no Ray and no model: ranking by the objective, the champion decision,
the prompt shape of a data file, the base model's weight hash and its refusal."""

from __future__ import annotations

import json
import shutil

import pytest

from orchestrator import leaderboard
from orchestrator.champion import Measure, decide
from orchestrator.model_code import base_location, weights_sha256
from orchestrator.prompt_shape import _shared_opening, prompt_shape


def _row(trial: str, score, eval_loss, cost_usd: float) -> leaderboard.Row:
    return leaderboard.Row(
        trial, "lora", 4, 8.0, "all_linear", 1e-3, score, eval_loss, cost_usd, 1.0, "completed", ""
    )


def test_rows_rank_by_the_objective_not_always_by_score():
    rows = [_row("a", 0.9, 2.0, 0.01), _row("b", 0.5, 1.0, 0.02), _row("c", None, None, 0.0)]
    by_loss = sorted(rows, key=leaderboard.rank_key("eval_loss", "min"))
    by_score = sorted(rows, key=leaderboard.rank_key("score", "max"))
    assert [r.trial for r in by_loss] == ["b", "a", "c"]
    assert [r.trial for r in by_score] == ["a", "b", "c"]
    assert leaderboard.best_row(by_loss).trial == "b"


def test_champion_moves_only_when_better_on_the_same_ground_or_forced():
    old = Measure("test", "sha-1", "json_field_match", 0.80, 1.5)
    worse = Measure("test", "sha-1", "json_field_match", 0.70, 1.4)
    better = Measure("test", "sha-1", "json_field_match", 0.85, 1.6)
    assert decide(worse, None, None, "score", "max").move  # no champion yet
    keep = decide(worse, "1", old, "score", "max")
    assert not keep.move and "not better than version 1" in keep.reason
    assert decide(better, "1", old, "score", "max").move
    assert decide(worse, "1", old, "eval_loss", "min").move  # lower loss wins under eval_loss
    assert not decide(old, "1", old, "score", "max").move  # a tie keeps the champion
    assert decide(worse, "1", old, "score", "max", force=True).move
    elsewhere = Measure("test", "sha-2", "json_field_match", 0.10, 9.0)
    with pytest.raises(ValueError, match="another split"):
        decide(better, "1", elsewhere, "score", "max")
    assert Measure.from_tags(old.tags()) == old and Measure.from_tags({}) is None


def test_prompt_shape_finds_the_instruction_and_the_validation_example(tmp_path):
    def rows(inputs):
        return "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You answer in JSON."},
                        {"role": "user", "content": f"Extract the listing as JSON: {x}"},
                        {"role": "assistant", "content": "{}"},
                    ]
                }
            )
            + "\n"
            for x in inputs
        )

    (tmp_path / "train.jsonl").write_text(rows(["2 bed in Reno", "3 bath in Austin"]))
    (tmp_path / "val.jsonl").write_text(rows(["loft in Boise"]))

    class Tok:  # the few tokenizer members prompt_shape reads
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    shape = prompt_shape(tmp_path / "train.jsonl", tmp_path / "val.jsonl", "chat", Tok())
    assert shape.system_prompt == "You answer in JSON."
    assert shape.user_prefix == "Extract the listing as JSON:"
    assert shape.input_example == "Extract the listing as JSON: loft in Boise"
    assert shape.chat_template == "{{ messages }}"
    assert shape.rendered == (
        "<system>You answer in JSON.<user>Extract the listing as JSON: loft in Boise<assistant>"
    )
    assert any("starts with: Extract the listing" in line for line in shape.describe())
    assert _shared_opening(["2 bed house", "2 bath flat"]) is None  # short: a coincidence


def test_a_base_whose_weights_differ_is_refused(tmp_path, monkeypatch):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, weights in ((good, b"weights-1"), (bad, b"weights-2")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(weights)
    config = {"base_model": "/train/box/model", "base_path": "/train/box/model"}
    config["base_sha256"] = weights_sha256(good)
    with pytest.raises(FileNotFoundError, match="LORASWEEP_BASE_MODEL"):
        base_location(config)  # the training machine's folder is not here
    monkeypatch.setenv("LORASWEEP_BASE_MODEL", str(bad))
    with pytest.raises(ValueError, match="not the ones this adapter was trained on"):
        base_location(config)
    monkeypatch.setenv("LORASWEEP_BASE_MODEL", str(good))
    assert base_location(config) == (str(good), None)
    monkeypatch.delenv("LORASWEEP_BASE_MODEL")
    assert base_location({**config, "base_path": str(good)}) == (str(good), None)
    # the embedded model: this machine's lorasweep cache holds it under the same folder name
    cache = tmp_path / "cache"
    shutil.copytree(good, cache / "models" / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("LORASWEEP_CACHE", str(cache))
    embedded = {**config, "base_model": "embedded", "base_path": "/home/x/SmolLM2-135M-Instruct"}
    assert base_location(embedded)[0] == str(cache / "models" / "SmolLM2-135M-Instruct")
    hub = {"base_model": "org/model", "base_revision": "abc123", "base_path": None}
    assert base_location(hub) == ("org/model", "abc123")
