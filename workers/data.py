"""Datasets: reading and checking JSONL rows, tokenising them for training and generation.

Two row formats are accepted, one example per line:
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` whose last
  message is the assistant's answer (the only tokens trained on);
- instruction: ``{"instruction": str, "input": str (optional), "output": str}``.

Files are UTF-8. A row longer than ``max_seq_len`` tokens is handled by ``truncation`` (the spec's
``data.truncation``): ``refuse`` is checked before anything is spent (``check_room``), so encoding
keeps today's cut of the end for rows that slip through; ``left`` drops the prompt's oldest
tokens so the whole answer fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

_ROLES = {"system", "user", "assistant"}


class DataError(Exception):
    """A data file or row is unusable; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    prompt: list[dict]  # messages before the answer
    answer: str
    line: int = field(default=0, compare=False)  # line in its file (0: not from a file)


MAX_BAD_ROWS_SHOWN = 5  # bad rows listed in one error; the rest are counted


def _row_problem(row: object, fmt: str) -> str | None:
    """What is wrong with one parsed row, in words naming the field; None if it is usable."""
    if not isinstance(row, dict):
        return f"each line must be a JSON object, this one is a {type(row).__name__}"
    if fmt == "instruction":
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            fields = " and ".join(f"`{k}`" for k in missing)
            return (
                f"missing string field {fields} (instruction format needs `instruction` and "
                "`output`, `input` optional)"
            )
        if "input" in row and not isinstance(row["input"], str | None):
            return "`input` must be a string"
        return None
    if "messages" not in row:
        return (
            f"no `messages` (keys: {sorted(row)}); a chat row is "
            '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}; '
            "for instruction rows set data.format: instruction"
        )
    messages = row["messages"]
    if not isinstance(messages, list):
        return f"`messages` must be a list of messages, not a {type(messages).__name__}"
    for i, msg in enumerate(messages):
        if (
            not isinstance(msg, dict)
            or msg.get("role") not in _ROLES
            or not isinstance(msg.get("content"), str)
        ):
            return f"messages[{i}] needs `role` (system|user|assistant) and a string `content`"
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return (
            f"`messages` has no assistant message (roles: {roles}); the last message must be "
            "the answer, role `assistant`"
        )
    if roles[-1] != "assistant":
        return (
            f"the last message, messages[{len(roles) - 1}], has role `{roles[-1]}`; it must have "
            "role `assistant` (the answer trained on)"
        )
    if len(roles) < 2:
        return "`messages` has only the answer; add the user message before it"
    return None


def _row_to_example(row: dict, fmt: str, line: int = 0) -> Example:
    """A row :func:`_row_problem` passed, as an :class:`Example`."""
    if fmt == "instruction":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return Example([{"role": "user", "content": user}], row["output"], line)
    messages = row["messages"]
    return Example([dict(m) for m in messages[:-1]], messages[-1]["content"], line)


def read_examples(path: Path, fmt: str = "chat", field: str = "data.train") -> list[Example]:
    """Every row of a JSONL file, checked; raises :class:`DataError` naming the spec field and
    every bad row (the first :data:`MAX_BAD_ROWS_SHOWN` with their line and problem)."""
    if not Path(path).is_file():
        raise DataError(
            f"{field}: file {path} not found; fix the path (relative paths are "
            "resolved against the spec's folder)"
        )
    examples, bad = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line, problem = _decode(raw, first=lineno == 1), None
            if isinstance(line, DataError):
                bad.append((where, str(line)))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON: {exc}"  # the parser's whole message (line, column)
            else:
                problem = _row_problem(row, fmt)
            if problem:
                bad.append((where, problem))
            elif not bad:  # once a row is bad, only the problems are kept
                examples.append(_row_to_example(row, fmt, lineno))
    if bad:
        raise DataError(_bad_rows(field, path, bad))
    if not examples:
        raise DataError(f"{field}: {path} has no rows")
    return examples


def _bad_rows(field: str, path: Path, bad: list[tuple[str, str]]) -> str:
    """One message for every bad row of a file (``(file:line, problem)``): the first few in
    full, the rest counted."""
    if len(bad) == 1:
        return f"{field} ({bad[0][0]}): {bad[0][1]}"
    shown = [f"{where}: {problem}" for where, problem in bad[:MAX_BAD_ROWS_SHOWN]]
    more = len(bad) - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    return f"{field}: {len(bad)} bad rows in {path}:\n  " + "\n  ".join(shown) + tail


def _decode(raw: bytes, first: bool) -> str | DataError:
    """One line of a data file as text, or the error of a byte that is not UTF-8 (naming its
    column)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")  # a BOM may open the file
    except UnicodeDecodeError as exc:
        return DataError(
            f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
            "save the file as UTF-8"
        )


def encode_answer(tokenizer, ex: Example) -> list[int]:
    """The answer's tokens, end-of-sequence included (what training learns)."""
    return tokenizer(ex.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def encode_for_training(
    tokenizer, ex: Example, max_seq_len: int, truncation: str = "refuse"
) -> tuple[list[int], list[int]]:
    """Token ids and labels; prompt tokens are masked with -100 so only the answer is learned.

    A row over ``max_seq_len``: with ``truncation="left"`` the prompt's oldest tokens go so the
    whole answer fits (while the answer leaves room for a prompt token); otherwise the end is
    cut (``refuse`` rows were refused before the sweep, see ``check_room``)."""
    prompt_ids = encode_prompt(tokenizer, ex)
    answer_ids = encode_answer(tokenizer, ex)
    keep = max_seq_len - len(answer_ids)  # prompt tokens that fit next to the whole answer
    if truncation == "left" and 1 <= keep < len(prompt_ids):
        prompt_ids = prompt_ids[-keep:]
    ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return ids, labels


def encode_prompt(
    tokenizer, ex: Example, max_len: int | None = None, truncation: str = "refuse"
) -> list[int]:
    """The prompt's tokens, ending where the answer starts. With ``truncation="left"`` and a
    ``max_len``, only its last ``max_len`` tokens (for generation within ``max_seq_len``:
    ``max_len = max_seq_len - max_new_tokens``); otherwise all of them."""
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    else:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in ex.prompt) + "\nassistant: "
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if truncation == "left" and max_len is not None and len(ids) > max_len:
        ids = ids[-max_len:]
    return ids


def check_room(
    tokenizer,
    examples: list[Example],
    field: str,
    path: Path,
    max_seq_len: int,
    truncation: str = "refuse",
    new_tokens: int | None = None,
) -> list[int]:
    """Every row fits ``max_seq_len`` tokens, or raise :class:`DataError` naming the spec
    ``field``, the file and line, and the fix; returns each row's length as encoded.

    Training rows (``new_tokens`` None) need prompt + answer; validation rows scored by
    generation need prompt + ``new_tokens``. ``truncation="left"`` lets a long prompt through
    (its oldest tokens go) as long as the answer alone leaves room for one prompt token."""
    lengths = []
    for ex in examples:
        prompt = len(encode_prompt(tokenizer, ex))
        answer = new_tokens if new_tokens is not None else len(encode_answer(tokenizer, ex))
        if prompt + answer > max_seq_len and (truncation != "left" or answer >= max_seq_len):
            where = f"{field} ({path}:{ex.line})"
            raise DataError(_no_room(where, prompt, answer, max_seq_len, new_tokens))
        lengths.append(min(prompt + answer, max_seq_len))
    return lengths


def _no_room(where: str, prompt: int, answer: int, max_seq_len: int, new_tokens) -> str:
    """The refusal of a row that leaves no room for its answer, with the fix."""
    need = f"raise trial.max_seq_len to at least {prompt + answer}"
    if new_tokens is not None:
        return (
            f"{where}: prompt of {prompt} tokens + trial.max_new_tokens {new_tokens} exceed "
            f"trial.max_seq_len {max_seq_len}; {need}, lower trial.max_new_tokens, or set "
            "data.truncation: left (drops the prompt's oldest tokens)"
        )
    if answer >= max_seq_len:
        return (
            f"{where}: the answer alone is {answer} tokens, trial.max_seq_len is {max_seq_len}; "
            f"{need} or shorten the answer"
        )
    return (
        f"{where}: prompt of {prompt} + answer of {answer} tokens exceed trial.max_seq_len "
        f"{max_seq_len}, so the answer would be cut; {need} or set data.truncation: left "
        "(drops the prompt's oldest tokens so the answer fits)"
    )


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
