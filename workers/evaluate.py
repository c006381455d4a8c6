"""Evaluation: teacher-forced eval loss and a generation score.

Score = field-level exact-match accuracy of greedy generations: when the reference answer is a JSON
object, each of its fields counts once (lists compare as multisets, numbers numerically; a
generation that is not valid JSON gets every field wrong); otherwise the whole stripped answer must
match exactly.

Greedy generation is not run token by token where it need not be (``evaluate``). One teacher-forced
forward pass over prompt + reference answer gives the eval loss and, at every answer position, the
token greedy decoding would pick after that prefix. Greedy decoding reproduces the reference up to
the first position where that pick differs: a row whose picks all match (end-of-sequence included)
generates exactly its reference, and is done; any other row is generated onwards only from its
first differing token. The generations are the ones ``generate`` makes (up to floating-point
rounding, which can flip a near-tie either way, as batching already does); what is saved is every
decoding step of the matching prefixes. Models whose generation config changes greedy decoding
(repetition penalty and the like) take the plain path.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from workers.data import Example, encode_for_training, encode_prompt


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


# generation-config fields that make decoding differ from the plain argmax of the logits
_NOT_PLAIN = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
}


def _plain_greedy(model) -> bool:
    config = getattr(model, "generation_config", None)
    return config is None or all(
        getattr(config, k, None) in allowed for k, allowed in _NOT_PLAIN.items()
    )


def _answer_logits(model, ids, mask, positions):
    """Float32 logits at ``positions`` (a [rows, positions] index) of a right-padded batch; only
    those rows of the output head are computed where the architecture allows it."""
    import torch

    from workers import fast

    if fast.supported(model):
        lm = fast.causal_lm(model)
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
        picked = torch.gather(
            hidden.last_hidden_state,
            1,
            positions.unsqueeze(-1).expand(-1, -1, lm.config.hidden_size),
        )
        return lm.get_output_embeddings()(picked).float()
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.gather(logits, 1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()


def _teacher_forced(model, tokenizer, examples, max_seq_len, batch_size):
    """Per example: (prompt ids, answer ids, greedy picks along the answer, loss sum, loss
    tokens)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        rows = []
        for ex in examples[i : i + batch_size]:
            full, labels = encode_for_training(tokenizer, ex, 10**9)
            n_prompt = next(t for t, label in enumerate(labels) if label != -100)
            prompt, answer = full[:n_prompt], full[n_prompt:]
            # loss over the answer tokens training sees (within the first max_seq_len positions)
            rows.append((prompt, answer, max(0, min(len(answer), max_seq_len - n_prompt))))
        width = max(len(p) + len(a) for p, a, _ in rows)
        span = max(len(a) for _, a, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        pos = torch.zeros((len(rows), span), dtype=torch.long)
        for j, (p, a, _) in enumerate(rows):
            ids[j, : len(p) + len(a)] = torch.tensor(p + a)
            mask[j, : len(p) + len(a)] = 1
            pos[j, : len(a)] = torch.arange(len(p) - 1, len(p) - 1 + len(a))
        with torch.no_grad():
            logits = _answer_logits(model, ids.to(device), mask.to(device), pos.to(device))
        for j, (p, a, n_loss) in enumerate(rows):
            target = torch.tensor(a[:n_loss], device=device)
            loss = F.cross_entropy(logits[j, :n_loss], target, reduction="sum") if n_loss else 0.0
            picks = logits[j, : len(a)].argmax(-1).tolist()
            out.append((p, a, picks, float(loss), n_loss))
    return out


def evaluate(
    model, tokenizer, examples: list[Example], max_seq_len: int, max_new_tokens: int, batch_size
) -> dict:
    """``{"eval_loss", "generations", "rows_generated", "tokens_generated"}``: the mean answer
    cross-entropy and the greedy generations of every example (see the module's notes)."""
    model.eval()
    if not _plain_greedy(model):
        generations = generate(model, tokenizer, examples, max_new_tokens)
        forced = _teacher_forced(model, tokenizer, examples, max_seq_len, batch_size)
        return _result(forced, generations, len(examples), len(examples) * max_new_tokens)
    eos = tokenizer.eos_token_id
    forced = _teacher_forced(model, tokenizer, examples, max_seq_len, batch_size)
    heads: list[list[int]] = []  # what greedy decoding emits before any generation is needed
    pending: list[tuple[int, list[int], int]] = []  # (example, prefix, tokens still to generate)
    for k, (prompt, answer, picks, _, _) in enumerate(forced):
        answer = answer[:max_new_tokens]
        first = next((t for t in range(len(answer)) if picks[t] != answer[t]), len(answer))
        head = answer[:first] if first == len(answer) else answer[:first] + [picks[first]]
        heads.append(head)
        if head and head[-1] != eos and len(head) < max_new_tokens and first < len(answer):
            pending.append((k, prompt + head, max_new_tokens - len(head)))
    tails = generate_ids(model, tokenizer, [p for _, p, _ in pending], [n for *_, n in pending])
    for (k, _, _), tail in zip(pending, tails, strict=True):
        heads[k] = heads[k] + tail
    generations = [tokenizer.decode(h, skip_special_tokens=True) for h in heads]
    return _result(forced, generations, len(pending), sum(len(t) for t in tails))


def _result(forced, generations, rows_generated, tokens_generated) -> dict:
    loss = sum(f[3] for f in forced)
    tokens = sum(f[4] for f in forced)
    return {
        "eval_loss": loss / max(tokens, 1),
        "generations": generations,
        "rows_generated": rows_generated,
        "tokens_generated": tokens_generated,
    }


def generate_ids(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: list[int], batch_size: int = 24
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (left-padded batches), each cut at its own
    ``max_new_tokens`` and after its first end-of-sequence token."""
    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    outputs: list[list[int]] = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        chunk, limits = prompts[i : i + batch_size], max_new_tokens[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(limits),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        for row, limit in zip(out[:, width:].tolist(), limits, strict=True):
            row = row[:limit]
            outputs.append(row[: row.index(eos) + 1] if eos in row else row)
    return outputs


def generate(
    model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = 24
) -> list[str]:
    """Greedy completions of each example's prompt, generated token by token."""
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    ids = generate_ids(model, tokenizer, prompts, [max_new_tokens] * len(prompts), batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
