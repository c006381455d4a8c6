"""Datasets: reading and checking JSONL rows, tokenising them for training and generation.

Two row formats are accepted, one example per line:
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` whose last
  message is the assistant's answer (the only tokens trained on);
- instruction: ``{"instruction": str, "input": str (optional), "output": str}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_ROLES = {"system", "user", "assistant"}


class DataError(Exception):
    """A data file or row is unusable; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    prompt: list[dict]  # messages before the answer
    answer: str


def _row_to_example(row: object, fmt: str, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if fmt == "instruction":
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise DataError(
                    f"{where}: missing string field `{key}` (instruction format needs "
                    "`instruction` and `output`, `input` optional)"
                )
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return Example([{"role": "user", "content": user}], row["output"])
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            f"{where}: missing field `messages` (a list of at least a user and an "
            "assistant message); for instruction rows set data.format: instruction"
        )
    for i, msg in enumerate(messages):
        if (
            not isinstance(msg, dict)
            or msg.get("role") not in _ROLES
            or not isinstance(msg.get("content"), str)
        ):
            raise DataError(
                f"{where}: messages[{i}] needs `role` (system|user|assistant) and a "
                "string `content`"
            )
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must have role `assistant` (the answer)")
    return Example([dict(m) for m in messages[:-1]], messages[-1]["content"])


def read_examples(path: Path, fmt: str = "chat", field: str = "data.train") -> list[Example]:
    """Every row of a JSONL file, checked; raises :class:`DataError` naming the spec field."""
    if not Path(path).is_file():
        raise DataError(
            f"{field}: file {path} not found; fix the path (relative paths are "
            "resolved against the spec's folder)"
        )
    examples = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{field} ({path}:{lineno})"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            examples.append(_row_to_example(row, fmt, where))
    if not examples:
        raise DataError(f"{field}: {path} has no rows")
    return examples


def encode_for_training(tokenizer, ex: Example, max_seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; prompt tokens are masked with -100 so only the answer is learned."""
    prompt_ids = encode_prompt(tokenizer, ex)
    answer_ids = tokenizer(ex.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return ids, labels


def encode_prompt(tokenizer, ex: Example) -> list[int]:
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in ex.prompt) + "\nassistant: "
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` tensors."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        ids[i, : len(r_ids)] = torch.tensor(r_ids)
        labels[i, : len(r_labels)] = torch.tensor(r_labels)
        mask[i, : len(r_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
