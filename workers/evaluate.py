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
first differing token, on the teacher-forced pass's own KV cache (no second prefill).

Decoding from there feeds, at each step, a row's last token and a guess of the tokens that follow
(taken where the generation's last 3 or 2 tokens occur in the reference answer, else in the
prompt: JSON keys and punctuation, values copied from the text); one forward pass checks the whole
guess, and the guessed tokens greedy's own picks confirm are kept with greedy's next pick
(prompt-lookup decoding, with the reference as the main lookup). So the tokens are greedy's, in
fewer steps. The generations are the ones ``generate`` makes (up to floating-point rounding,
which can flip a near-tie either way, as batching already does). Models whose generation config
changes greedy decoding (repetition penalty and the like) take the plain path.

Two routes run those steps: on CPU, transformers' own KV cache (each step as wide as its longest
guess, finished rows leave the batch: compute is what costs there); on CUDA, one fixed shape on a
static cache replayed as a CUDA graph (``workers/static_decode.py``: launches are what cost
there). Either way up to ``MAX_CHUNK_ROWS`` rows go at a time within a memory allowance
(``token_allowance``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field

from workers import static_decode
from workers.data import Example, encode_for_training, encode_prompt

# Most guessed tokens fed per decoding step. Guesses cost little: a decoding step of a few rows
# is bound by kernel launches on a GPU and by reading the weights from memory on a CPU.
DRAFT_TOKENS = {"cuda": 12, "cpu": 8}
GENERATE_BATCH = 24  # rows decoded together by the plain path
# devices whose decoding steps take one fixed shape on a static cache (CUDA: replayed as a graph)
STATIC_DEVICES = {"cuda"}
# most rows evaluated together where decoding goes on from the teacher-forced pass's cache (at
# least the caller's batch, within its token allowance): a batch takes as many steps as its slowest
# row, where separate batches take the sum; on a GPU a step of 32 rows costs about what one of 8
# does, and on a CPU fewer, larger batches cost less per token (16 rows x 80 tokens of the demo
# model, 1 thread: 12.4 s in one batch, 13.5-13.8 s in four)
MAX_CHUNK_ROWS = 32
DRAFT_NGRAM = 3  # longest suffix of a generation looked up to guess what follows (shortest 2)


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


def _forward(model, ids, mask, positions=None, cache=None, pick=None, keep_cache=True):
    """Float32 logits (at ``pick``, a [rows, k] index, when given) and the KV cache. Only the
    picked rows of the output head are computed where the architecture allows it."""
    from workers import fast

    out, cache = _picked(model, ids, mask, positions, cache, pick, keep_cache)
    if fast.supported(model):
        out = fast.causal_lm(model).get_output_embeddings()(out)
    return out.float(), cache


def _picked(model, ids, mask, positions, cache, pick, keep_cache):
    """(the last hidden states at ``pick`` where the architecture's logits are plainly the output
    head's projection of them (``fast.supported``), else the logits there; the KV cache)."""
    import torch

    from workers import fast

    def at_pick(x):
        return (
            x
            if pick is None
            else torch.gather(x, 1, pick.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        )

    lm = fast.causal_lm(model)
    if isinstance(cache, static_decode.StaticKV):
        return at_pick(static_decode.forward(lm.get_decoder(), cache, ids, positions)), cache
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "use_cache": keep_cache,
    }
    if fast.supported(model):
        decoder = lm.get_decoder()
        out = decoder(**kwargs, **fast.cache_kwargs(decoder, cache))
        return at_pick(out.last_hidden_state), fast.returned_cache(out)
    out = lm(**kwargs, **fast.cache_kwargs(lm, cache))
    return at_pick(out.logits), fast.returned_cache(out)


@dataclass
class _Row:
    prompt: list[int]
    answer: list[int]
    picks: list[int]  # greedy's choice after each answer prefix (teacher-forced)
    loss: float
    n_loss: int
    head: list[int] = field(default_factory=list)  # the generation so far


def _rows(tokenizer, examples, max_seq_len: int, prompt_limit: int | None = None) -> list[_Row]:
    """Each example's prompt and reference answer; ``prompt_limit`` keeps only the prompt's last
    tokens (``data.truncation: left``)."""
    rows = []
    for ex in examples:
        full, labels = encode_for_training(tokenizer, ex, 10**9)
        n_prompt = next(t for t, label in enumerate(labels) if label != -100)
        prompt, answer = full[:n_prompt], full[n_prompt:]
        if prompt_limit is not None and len(prompt) > prompt_limit:
            prompt, n_prompt = prompt[-prompt_limit:], prompt_limit
        # loss over the answer tokens training sees (within the first max_seq_len positions)
        rows.append(_Row(prompt, answer, [], 0.0, max(0, min(len(answer), max_seq_len - n_prompt))))
    return rows


def _static_length(rows: list[_Row], room: int) -> int:
    """Positions of a ``StaticKV`` for ``rows``: the teacher-forced pass's, and ``room`` beyond
    the longest prompt."""
    width = max(len(r.prompt) + len(r.answer) for r in rows)
    return max(width, max(len(r.prompt) for r in rows) + room)


def _teacher_forced(model, tokenizer, rows: list[_Row], keep_cache, static_kv=None):
    """One right-padded forward pass over prompt + reference answer of ``rows``, which gives
    their loss and picks, and the pass's KV cache (None unless ``keep_cache``): ``static_kv``
    when given (a ``StaticKV`` of at least the pass's positions), else transformers' own."""
    import torch
    import torch.nn.functional as F

    from workers import fast

    device = next(model.parameters()).device
    width = max(len(r.prompt) + len(r.answer) for r in rows)
    span = max(len(r.answer) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos = torch.zeros((len(rows), span), dtype=torch.long)
    for j, r in enumerate(rows):
        n = len(r.prompt) + len(r.answer)
        ids[j, :n] = torch.tensor(r.prompt + r.answer)
        mask[j, :n] = 1
        pos[j, : len(r.answer)] = torch.arange(len(r.prompt) - 1, n - 1)
    cache, positions = static_kv, None
    if static_kv is not None:
        positions = torch.arange(width).expand(len(rows), -1).to(device)
    with torch.no_grad():
        out, cache = _picked(
            model, ids.to(device), mask.to(device), positions, cache, pos.to(device), keep_cache
        )
        head = fast.causal_lm(model).get_output_embeddings() if fast.supported(model) else None
        for j, r in enumerate(rows):  # one row's logits at a time: big chunks stay affordable
            logits = out[j, : len(r.answer)]
            logits = (head(logits) if head is not None else logits).float()
            target = torch.tensor(r.answer[: r.n_loss], device=device)
            if r.n_loss:
                r.loss = float(F.cross_entropy(logits[: r.n_loss], target, reduction="sum"))
            r.picks = logits.argmax(-1).tolist()
    return (cache if keep_cache else None), width


def _without_cudnn_attention(model):
    """On CUDA: SDPA without its cuDNN backend. Decoding meets a new key length at every step,
    and cuDNN attention builds a plan for each new shape (~50 ms a step on the H100, more than
    the rest of a small model's step); the flash and memory-efficient kernels need none."""
    if next(model.parameters()).device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends)


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    max_seq_len: int,
    max_new_tokens: int,
    batch_size: int,
    chunk_tokens: int | None = None,
    *,
    keep_graphs: bool = False,
    prompt_limit: int | None = None,
) -> dict:
    """``{"eval_loss", "generations", "rows_generated", "tokens_generated", "decode_steps"}``:
    the mean answer cross-entropy and the greedy generations of every example (see the module's
    notes), with how many rows were decoded, how many tokens and in how many forward steps.
    Rows go ``batch_size`` at a time, or up to ``MAX_CHUNK_ROWS`` where decoding goes on from
    the teacher-forced cache and ``chunk_tokens`` (rows x their prompt, answer and decoding room)
    allows. ``keep_graphs``: on the static route, keep each batch's cache and captured decoding
    steps for the next eval of this model (``static_decode.keep``); only where the forward reads
    no adapter weights (merged, or none) and no compiled layers run in between. ``prompt_limit``:
    prompts keep only their last tokens (``data.truncation: left``)."""
    with _without_cudnn_attention(model):
        return _evaluate(
            model,
            tokenizer,
            examples,
            max_seq_len,
            max_new_tokens,
            batch_size,
            chunk_tokens,
            keep_graphs,
            prompt_limit,
        )


# tokens an eval batch may hold per token of a training micro-batch: a token's keys and values
# (what an eval pass keeps across layers) take 6-20x less memory than the activations a training
# step keeps for it (LoRA on Llama shapes), but up to 2x a gradient-checkpointed step's
EVAL_TOKENS_PER_TRAIN_TOKEN = 4


def token_allowance(batch_size: int, max_seq_len: int, checkpointed: bool = False) -> int:
    """``chunk_tokens`` for ``evaluate`` that keeps an eval batch's memory under that of a
    training step of ``batch_size`` rows of ``max_seq_len`` tokens."""
    return batch_size * max_seq_len * (1 if checkpointed else EVAL_TOKENS_PER_TRAIN_TOKEN)


def _chunks(rows: list[_Row], batch_size: int, chunk_tokens: int | None, room: int | None):
    size = batch_size
    if room is not None and chunk_tokens:
        longest = max(len(r.prompt) + max(len(r.answer), room) for r in rows)
        size = max(batch_size, min(MAX_CHUNK_ROWS, chunk_tokens // longest))
    n = -(-len(rows) // size)
    size = -(-len(rows) // n)  # as even as possible
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _evaluate(
    model,
    tokenizer,
    examples,
    max_seq_len,
    max_new_tokens,
    batch_size,
    chunk_tokens,
    keep_graphs,
    prompt_limit=None,
) -> dict:
    model.eval()
    forced = _rows(tokenizer, examples, max_seq_len, prompt_limit)
    if not _plain_greedy(model):  # every row decoded from its prompt, as ``generate`` does
        for c in _chunks(forced, batch_size, None, None):
            _teacher_forced(model, tokenizer, c, False)
        tokens, steps = _generate_onwards(forced, model, tokenizer, max_new_tokens)
        generations = [tokenizer.decode(r.head, skip_special_tokens=True) for r in forced]
        return _result(forced, generations, len(forced), tokens, steps)
    eos = tokenizer.eos_token_id
    reuse = _cache_reusable(model)
    device = next(model.parameters()).device
    most = DRAFT_TOKENS.get(device.type, DRAFT_TOKENS["cpu"])
    decoding = max_new_tokens + 1 + most if reuse else None  # positions a row may still take
    room = decoding if device.type in STATIC_DEVICES else None  # on the static route
    keep = keep_graphs and room is not None
    rows_generated, tokens_generated, steps = 0, 0, 0
    for rows in _chunks(forced, batch_size, chunk_tokens, decoding):
        length = _static_length(rows, room) if room is not None else None
        shape = (len(rows), length, 1 + most)  # of the static route's steps
        kept = static_decode.kept(model, *shape) if keep else None
        kv = kept.steps.kv if kept else None if length is None else static_decode.StaticKV(length)
        cache, width = _teacher_forced(model, tokenizer, rows, reuse, kv)
        pending = []  # (row, answer tokens greedy decoding reproduces) of rows still to decode
        for j, r in enumerate(rows):
            answer = r.answer[:max_new_tokens]
            first = next((t for t in range(len(answer)) if r.picks[t] != answer[t]), len(answer))
            r.head = answer[:first] if first == len(answer) else answer[:first] + [r.picks[first]]
            if first < len(answer) and r.head[-1] != eos and len(r.head) < max_new_tokens:
                pending.append((j, first))
        if not pending:
            continue
        todo = [rows[j] for j, _ in pending]
        if reuse:
            kept_len = [len(rows[j].prompt) + first for j, first in pending]
            index = [j for j, _ in pending]
            if keep:  # every row of the batch steps (one shape for the kept graph)
                found = (
                    kept.steps if kept else static_decode.Steps(model, cache, len(rows), 1 + most)
                )
                stepper = _StaticSteps(found, index, own=False)
            elif room is not None:
                cache.select(index)
                stepper = _StaticSteps(static_decode.Steps(model, cache, len(todo), 1 + most))
            else:
                stepper = _CacheSteps(model, cache, width, index, kept_len)
            try:
                tokens, n_steps = _continue(stepper, todo, kept_len, max_new_tokens, eos, most)
            finally:
                stepper.close()
            if keep and kept is None and not static_decode.keep(model, *shape, stepper.steps):
                stepper.steps.close()
        else:
            tokens, n_steps = _generate_onwards(todo, model, tokenizer, max_new_tokens)
        rows_generated += len(pending)
        tokens_generated += tokens
        steps += n_steps
    generations = [tokenizer.decode(r.head, skip_special_tokens=True) for r in forced]
    return _result(forced, generations, rows_generated, tokens_generated, steps)


def _cache_reusable(model) -> bool:
    """Whether decoding can go on from the teacher-forced pass's KV cache: the decoders of
    ``fast.SUPPORTED`` without sliding-window attention (whose cache drops old positions)."""
    from workers import fast, packing

    return fast.supported(model) and not packing.sliding_window(fast.causal_lm(model).config)


def _generate_onwards(rows: list[_Row], model, tokenizer, max_new_tokens) -> tuple[int, int]:
    """Plain greedy decoding of ``rows`` onwards from their heads (prompt and head prefilled
    again); returns (tokens decoded, an upper bound of the decoding steps)."""
    limits = [max_new_tokens - len(r.head) for r in rows]
    tails = generate_ids(model, tokenizer, [r.prompt + r.head for r in rows], limits)
    for r, tail in zip(rows, tails, strict=True):
        r.head += tail
    batches = range(0, len(rows), GENERATE_BATCH)
    return sum(map(len, tails)), sum(max(limits[i : i + GENERATE_BATCH]) for i in batches)


def _draft(
    context: list[int], sources: list[tuple[list[int], int]], k: int, shortest: int = 2
) -> list[int]:
    """Up to ``k`` tokens guessed to follow ``context``: what follows its last 3 (else down to
    ``shortest``) tokens in the first source holding them, at the occurrence whose end lies
    nearest that source's expected offset (a reference answer: where the generation stands)."""
    for n in range(min(DRAFT_NGRAM, len(context)), shortest - 1, -1):
        key = context[-n:]
        for src, offset in sources:
            ends = [s + n for s in range(len(src) - n) if src[s : s + n] == key]
            if ends:
                end = min(ends, key=lambda e: abs(e - offset))
                return src[end : end + k]
    return []


def _continue(steps, rows: list[_Row], n_kept, max_new_tokens, eos, most) -> tuple[int, int]:
    """Greedy decoding of ``rows`` onwards from their heads, on the teacher-forced pass's KV
    cache, of which each row keeps its first ``n_kept`` positions (the prompt and the reference
    prefix it reproduced); ``steps`` runs the forward passes (``_CacheSteps`` or
    ``_StaticSteps``).

    Each step feeds a row's last token and a guess of what follows (from its reference answer and
    prompt, ``_draft``, at most ``most`` tokens) and keeps the guessed tokens that greedy's own
    picks confirm, plus greedy's next pick: the tokens are greedy's, in fewer steps. Returns
    (tokens decoded, decoding steps run)."""
    import torch

    next_pos = list(n_kept)
    guess = [most] * len(rows)  # each row's guess length, longer while guesses hold
    live, decoded, n_steps = list(range(len(rows))), 0, 0
    while live:
        n_steps += 1
        drafts = []
        for j in live:
            r = rows[j]
            room = max_new_tokens - len(r.head) - 1  # the step's own pick comes on top
            sources = [(r.answer, len(r.head)), (r.prompt, len(r.prompt))]
            drafts.append(_draft(r.prompt + r.head, sources, min(guess[j], room)))
        width = steps.width(1 + max(map(len, drafts)))
        ids = torch.zeros((len(live), width), dtype=torch.long)
        fed = torch.zeros_like(ids)
        pos = torch.zeros_like(ids)
        for b, (j, d) in enumerate(zip(live, drafts, strict=True)):
            ids[b, : 1 + len(d)] = torch.tensor(rows[j].head[-1:] + d)
            fed[b, : 1 + len(d)] = 1
            pos[b] = torch.arange(next_pos[j], next_pos[j] + width)
        picks = steps(live, ids, fed, pos)
        kept = torch.zeros_like(ids)
        still = []
        for b, (j, d) in enumerate(zip(live, drafts, strict=True)):
            r, g = rows[j], picks[b]
            m = 0
            while m < len(d) and d[m] == g[m]:
                m += 1
            out = d[:m] + [g[m]]
            if eos in out:
                out = out[: out.index(eos) + 1]
            out = out[: max_new_tokens - len(r.head)]
            r.head += out
            decoded += len(out)
            kept[b, : m + 1] = 1  # the fed token and the confirmed guesses are context now
            if d:
                guess[j] = min(most, guess[j] + 2) if m == len(d) else max(1, m)
            next_pos[j] += m + 1
            if r.head[-1] != eos and len(r.head) < max_new_tokens:
                still.append(b)
        steps.keep(kept, still)
        live = [live[b] for b in still]
    return decoded, n_steps


class _CacheSteps:
    """Decoding steps on transformers' own KV cache: each step as wide as its longest guess;
    rejected positions stay in the cache, masked out; finished rows leave the batch."""

    def __init__(self, model, cache, width: int, index: list[int], n_kept: list[int]) -> None:
        import torch

        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        cache.batch_select_indices(torch.tensor(index, device=self.device))
        valid = torch.zeros((len(index), width), dtype=torch.long)
        for b, n in enumerate(n_kept):
            valid[b, :n] = 1
        self.valid = valid.to(self.device)

    def width(self, needed: int) -> int:
        return needed

    def __call__(self, live, ids, fed, pos) -> list[list[int]]:
        import torch

        mask = torch.cat([self.valid, fed.to(self.device)], 1)
        with torch.no_grad():
            logits, self.cache = _forward(
                self.model, ids.to(self.device), mask, pos.to(self.device), self.cache
            )
        return logits.argmax(-1).tolist()

    def keep(self, kept, still: list[int]) -> None:
        import torch

        self.valid = torch.cat([self.valid, kept.to(self.device)], 1)
        if len(still) < self.valid.shape[0] and still:
            at = torch.tensor(still, device=self.device)
            self.cache.batch_select_indices(at)
            self.valid = self.valid[at]

    def close(self) -> None:
        self.cache = None


class _StaticSteps:
    """Decoding steps of one fixed shape on a ``StaticKV`` (every row of ``steps``, ``width``
    tokens each), replayed as a CUDA graph on a GPU (``workers/static_decode.py``). The rows
    decoded are the cache's rows ``rows_at`` (all of them by default); the others (rows not
    decoded, finished rows) are fed what they were fed last, and only ever write their own row
    of the cache. ``own=False``: the steps belong to the caller (kept for the next eval)."""

    def __init__(self, steps, rows_at: list[int] | None = None, own: bool = True) -> None:
        import torch

        self.steps, self.own = steps, own
        rows, self.fixed = steps.ids.shape
        self.rows_at = list(range(rows)) if rows_at is None else rows_at
        self.ids = torch.zeros((rows, self.fixed), dtype=torch.long)
        self.pos = torch.zeros_like(self.ids)  # finished rows keep their last positions

    def width(self, needed: int) -> int:
        return self.fixed

    def __call__(self, live, ids, fed, pos) -> list[list[int]]:
        at = [self.rows_at[j] for j in live]
        self.ids[at] = ids
        self.pos[at] = pos
        picks = self.steps(self.ids, self.pos)
        return [picks[j] for j in at]

    def keep(self, kept, still: list[int]) -> None:
        pass  # the next step overwrites rejected positions

    def close(self) -> None:
        if self.own:
            self.steps.close()


def _result(forced: list[_Row], generations, rows_generated, tokens_generated, steps) -> dict:
    return {
        "decode_steps": steps,
        "eval_loss": sum(r.loss for r in forced) / max(sum(r.n_loss for r in forced), 1),
        "generations": generations,
        "rows_generated": rows_generated,
        "tokens_generated": tokens_generated,
    }


def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    batch_size: int = GENERATE_BATCH,
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
        with torch.no_grad(), _without_cudnn_attention(model):
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
    model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = GENERATE_BATCH
) -> list[str]:
    """Greedy completions of each example's prompt, generated token by token."""
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    ids = generate_ids(model, tokenizer, prompts, [max_new_tokens] * len(prompts), batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
