"""Evaluation: teacher-forced eval loss and a generation score.

Score = field-level exact-match accuracy of greedy generations: when the reference answer is a JSON
object, each of its fields counts once (lists compare as multisets, numbers numerically; a
generation that is not valid JSON gets every field wrong); otherwise the whole stripped answer must
match exactly.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from workers.data import Example, encode_for_training, encode_prompt, pad_batch


def _parse_object(text: str) -> dict | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        out = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    return out if isinstance(out, dict) else None


def _same(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return Counter(map(json.dumps, a)) == Counter(map(json.dumps, b))
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def field_scores(generated: str, reference: str) -> tuple[int, int]:
    """(fields right, fields total) of one generation against its reference answer."""
    ref = _parse_object(reference)
    if ref is None or not ref:
        return int(generated.strip() == reference.strip()), 1
    got = _parse_object(generated) or {}
    return sum(k in got and _same(got[k], v) for k, v in ref.items()), len(ref)


def score(generations: list[str], references: list[str]) -> float:
    right = total = 0
    for g, r in zip(generations, references, strict=True):
        a, b = field_scores(g, r)
        right, total = right + a, total + b
    return right / total if total else 0.0


def eval_loss(
    model, tokenizer, examples: list[Example], max_seq_len: int, batch_size: int
) -> float:
    """Mean per-token cross-entropy of the answers (prompt tokens masked)."""
    import torch

    device = next(model.parameters()).device
    total_loss = total_tokens = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            rows = [
                encode_for_training(tokenizer, ex, max_seq_len)
                for ex in examples[i : i + batch_size]
            ]
            batch = {k: v.to(device) for k, v in pad_batch(rows, tokenizer.pad_token_id).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(model(**batch).loss) * n
            total_tokens += n
    return total_loss / max(total_tokens, 1)


def generate(
    model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = 24
) -> list[str]:
    """Greedy completions of each example's prompt, batched with left padding."""
    import torch

    device = next(model.parameters()).device
    outputs: list[str] = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        prompts = [encode_prompt(tokenizer, ex) for ex in examples[i : i + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs
