"""Padding-free training batches: a batch's rows laid end to end in one sequence.

``pack(rows)`` concatenates the rows of a batch into a single row of exactly their tokens (no
padding), with position ids that restart at every row and the boundaries as cumulative lengths
(``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``: the names transformers passes on to an
attention function). Attention must then stay inside each row: the attention implementation
registered here (``ATTENTION``) does that with torch's variable-length flash attention on CUDA
(``torch.nn.attention.varlen``), and with one SDPA call per row elsewhere. Inputs that are not
packed (evaluation, generation with a padding mask) take the plain SDPA path, so a model set to
this implementation behaves as an ``sdpa`` model everywhere else.

No FLOP is spent on padding: the linear layers see only real tokens, and attention only the
causal block of each row. The first label of every row is masked, so no row learns to predict
its successor's first token (always a prompt token, masked anyway).
"""

from __future__ import annotations

import functools
import inspect

ATTENTION = "lorasweep_packed"
_registered = False


def pack(
    rows: list[tuple[list[int], list[int]]],
    bucket_tokens: int | None = None,
    max_length: int | None = None,
) -> dict:
    """One packed row: ``input_ids``, ``labels``, ``position_ids`` of shape [1, tokens], and the
    row boundaries for the attention.

    ``bucket_tokens`` rounds the length up to a multiple of it with one filler row (token 0, no
    labels, attending only to itself), so that CUDA graphs see few distinct shapes: at most
    ``bucket_tokens - 1`` filler tokens per batch. ``max_length`` fixes the longest-row bound the
    attention is given (any bound >= the longest row is correct) so it does not vary either."""
    import torch

    ids, labels, positions, bounds = [], [], [], [0]
    for r_ids, r_labels in rows:
        ids += r_ids
        labels += [-100] + list(r_labels[1:])
        positions += range(len(r_ids))
        bounds.append(bounds[-1] + len(r_ids))
    filler = -len(ids) % bucket_tokens if bucket_tokens else 0
    if filler:
        ids += [0] * filler
        labels += [-100] * filler
        positions += range(filler)
        bounds.append(bounds[-1] + filler)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(max(len(r) for r, _ in rows), filler, max_length or 0)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def to_device(batch: dict, device) -> dict:
    """A padded or packed batch on ``device`` (the packed row's length bounds are plain ints)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens_q" in batch


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


@functools.cache
def _varlen_params() -> frozenset[str]:
    """The keyword arguments this torch's ``varlen_attn`` takes (its API changed across
    releases); looked up once, not on every attention call."""
    from torch.nn.attention import varlen

    return frozenset(inspect.signature(varlen.varlen_attn).parameters)


def _varlen(module, query, key, value, cu, longest: int, scaling):
    """torch's varlen flash attention over [1, heads, tokens, dim] inputs (CUDA)."""
    import torch
    from torch.nn.attention import varlen

    params = _varlen_params()
    kwargs = {"scale": scaling}
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif groups > 1:  # older torch: repeat the key/value heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)  # causal
    dtype = query.dtype
    half = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    q, k, v = (t[0].transpose(0, 1).contiguous().to(half) for t in (query, key, value))
    out = varlen.varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)
    return out.to(dtype).unsqueeze(0)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention within each packed row; plain SDPA for inputs that are not packed."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    longest = int(kwargs["max_length_q"])
    if query.is_cuda and dropout == 0.0:
        return _varlen(module, query, key, value, cu.to(query.device), longest, scaling), None
    bounds = cu.tolist()
    outs = [
        _sdpa(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout, scaling)[0]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs, dim=1), None


def _mask(*args, attention_mask=None, **kwargs):
    """SDPA's mask, except for a packed row (no 2D mask): the attention needs none then."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, _mask)
    _registered = True


def sliding_window(config) -> bool:
    """Whether a model config has sliding-window attention switched on."""
    return bool(getattr(config, "sliding_window", None)) and getattr(
        config, "use_sliding_window", True
    )


def enable(lm) -> bool:
    """Switch a causal LM (not a PEFT wrapper) to the packed attention; False where it cannot
    (models with sliding-window attention or without the attention interface)."""
    config = lm.config
    if sliding_window(config):
        return False
    register()
    if config._attn_implementation != ATTENTION:
        try:
            lm.set_attn_implementation(ATTENTION)
        except (ValueError, KeyError, AttributeError):
            return False
    return config._attn_implementation == ATTENTION
