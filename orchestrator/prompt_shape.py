"""The prompt shape a sweep trained on: what a user must send for the adapter to answer well.

A model trained on rows whose user turn starts with an instruction answers garbage to the bare
input, and nothing in a model file says so. Promotion records this shape with the model (in its
config, its MLflow ``input_example`` and signature) and prints it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

MIN_PREFIX_CHARS = 12  # a shared opening shorter than this is a coincidence, not an instruction
PREFIX_ROWS = 200  # training rows read to find the shared opening of user turns


@dataclass
class PromptShape:
    data_format: str  # chat | instruction (workers/data.py)
    chat_template: str | None  # the tokenizer's template training encoded with; None: plain text
    system_prompt: str | None  # the training rows' system message, if they share one
    user_prefix: str | None  # the opening every training user turn shares (an instruction)
    input_example: str  # the user turn of this sweep's first validation row
    rendered: str = ""  # that row's prompt as the model reads it (template applied)

    def as_config(self) -> dict:
        return asdict(self)

    def describe(self, width: int = 100) -> list[str]:
        """Lines for ``promote``'s output."""
        template = "none (plain 'role: content' lines)"
        if self.chat_template:
            template = f"the tokenizer's ({len(self.chat_template)} chars, recorded)"
        lines = [f"format {self.data_format}, chat template {template}"]
        lines.append(f"system prompt: {_short(self.system_prompt, width) or 'none'}")
        if self.user_prefix:
            lines.append(f"every training user turn starts with: {_short(self.user_prefix, width)}")
        lines.append(f"input example (validation row 1): {_short(self.input_example, width)}")
        if self.rendered:  # what the model reads, newlines shown as \n
            lines.append(f"as the model reads it: {_short(repr(self.rendered)[1:-1], width)}")
        return lines


def _short(text: str | None, width: int) -> str | None:
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _user_turn(prompt: list[dict]) -> str:
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""


def _system(prompt: list[dict]) -> str | None:
    return prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None


def _shared_opening(texts: list[str]) -> str | None:
    """The longest opening all ``texts`` share, cut back to a word boundary; None when short."""
    if len(texts) < 2:
        return None
    prefix = os.path.commonprefix(texts)
    if len(prefix) < min(len(t) for t in texts):  # cut inside a word: back to its start
        cut = max(prefix.rfind(c) for c in " \n\t:")
        prefix = prefix[: cut + 1] if cut >= 0 else ""
    prefix = prefix.rstrip()
    return prefix if len(prefix) >= MIN_PREFIX_CHARS else None


def prompt_shape(
    train_path: Path, validation_path: Path, data_format: str, tokenizer
) -> PromptShape:
    """The shape of the sweep's rows, read from its data files and the tokenizer it used."""
    from workers.data import read_examples

    train = read_examples(Path(train_path), data_format, "data.train")[:PREFIX_ROWS]
    val = read_examples(Path(validation_path), data_format, "data.validation")
    systems = {_system(ex.prompt) for ex in train}
    rendered = ""
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            val[0].prompt, add_generation_prompt=True, tokenize=False
        )
    return PromptShape(
        data_format=data_format,
        chat_template=tokenizer.chat_template or None,
        system_prompt=systems.pop() if len(systems) == 1 else None,
        user_prefix=_shared_opening([_user_turn(ex.prompt) for ex in train]),
        input_example=_user_turn(val[0].prompt),
        rendered=rendered,
    )
