"""Scoring a model (base, or base + adapter) on a data split, outside any training run.

Used for the base model's score before a sweep and for the promoted adapter's test score.
"""

from __future__ import annotations

import time
from pathlib import Path

from workers import evaluate
from workers.data import read_examples
from workers.held import held_since
from workers.model import load_base_model, load_tokenizer


def load_with_adapter(
    model_ref: str, adapter_dir: str | Path | None, dtype: str = "auto", device: str = "cpu"
):
    """Tokenizer and model, with the LoRA adapter in ``adapter_dir`` applied when given."""
    tokenizer = load_tokenizer(model_ref)
    model = load_base_model(model_ref, dtype, device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return tokenizer, model.eval()


def score_split(
    model_ref: str,
    data_path: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    data_format: str = "chat",
    field: str = "data.validation",
    limit: int | None = None,
    max_new_tokens: int = 96,
    max_seq_len: int = 256,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "cpu",
    num_threads: int | None = None,
) -> dict:
    """``{"score", "eval_loss", "examples", "seconds", "held_s"}`` of one model on one split:
    ``seconds`` from this call's start; ``held_s`` from when its process held its resources
    (``workers/held.py``: in a Ray task, its worker's start), what the base eval is billed."""
    t0 = time.monotonic()
    since = held_since(t0)
    import torch

    if num_threads and device == "cpu":
        torch.set_num_threads(num_threads)
    examples = read_examples(Path(data_path), data_format, field)[:limit]
    tokenizer, model = load_with_adapter(model_ref, adapter_dir, dtype, device)
    allowance = evaluate.token_allowance(batch_size, max_seq_len)
    result = evaluate.evaluate(
        model, tokenizer, examples, max_seq_len, max_new_tokens, batch_size, allowance
    )
    return {
        "score": evaluate.score(result["generations"], [e.answer for e in examples]),
        "eval_loss": result["eval_loss"],
        "examples": len(examples),
        "seconds": time.monotonic() - t0,
        "held_s": time.monotonic() - since,
    }
