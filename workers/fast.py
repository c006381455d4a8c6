"""The fast training step: packed rows, compiled decoder layers, a chunked loss over answer tokens.

- A batch's rows are packed end to end without padding (``workers/packing.py``); attention stays
  inside each row (varlen flash attention on CUDA).
- Each decoder layer is compiled with ``torch.compile`` (regional compilation: one graph serves
  every layer, so compiling costs seconds, not minutes); LoRA's dropout, scaling and add fuse
  into the layer's kernels instead of each making a copy of the activations. On CUDA the layers
  replay as CUDA graphs: a small model's LoRA step is bound by kernel launches, not by the GPU.
- The loss is computed only where there are labels (answer tokens; prompt and padding positions
  never reach the output head), in chunks, each recomputed in backward: the [tokens x vocab]
  logits are never held whole, so large vocabularies cost neither memory nor a float32 copy.
- Adapter weights stay float32 (the optimizer's master copy) but the forward runs under bf16
  autocast, so PEFT's adapters multiply bf16 activations instead of float32 copies of them.
- The optimizer is AdamW's fused CUDA kernel (set in ``workers/train.py``).

``loss(model, batch)`` returns the same mean cross-entropy as ``model(**batch).loss`` (a test
checks it on CPU).
"""

from __future__ import annotations

import functools
import inspect

CHUNK_TOKENS = 4096  # rows of logits computed at once in the loss
# decoders whose logits are plainly lm_head(last hidden state) (no soft-capping or scaling)
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def causal_lm(model):
    """The ``...ForCausalLM`` inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> bool:
    return getattr(causal_lm(model).config, "model_type", None) in SUPPORTED


@functools.cache
def _takes_cache(forward_type: type) -> bool:
    return "cache" in inspect.signature(forward_type.forward).parameters


def cache_kwargs(module, cache) -> dict:
    """The KV-cache keyword ``module``'s forward takes: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (5.24 still accepts it, with a deprecation warning)."""
    return {"cache" if _takes_cache(type(module)) else "past_key_values": cache}


def returned_cache(out):
    """The KV cache in a model output (``cache`` from transformers 5.24, ``past_key_values``)."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


def compile_layers(model, cuda_graphs: bool = False) -> None:
    """Compile every decoder layer in place (dynamic sequence lengths). With ``cuda_graphs`` each
    layer's forward and backward replay as CUDA graphs (``mode="reduce-overhead"``): one launch
    instead of hundreds, which is what a small model's step is bound by. Shapes are static then:
    each distinct input shape compiles and records once, so callers keep the shapes few
    (``packing.pack(bucket_tokens=...)``), mark each step (``step_begin``) and run anything else
    uncompiled (``eager``). (Dynamic shapes under CUDA graphs crashed on the H100, torch 2.11.)"""
    import torch

    mode = "reduce-overhead" if cuda_graphs else None
    if cuda_graphs:  # static shapes: one compile per length bucket, not the default 8 at most
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
    for layer in causal_lm(model).get_decoder().layers:
        layer.compile(dynamic=not cuda_graphs, mode=mode)


def step_begin() -> None:
    """Tell CUDA-graph replays that a new training iteration starts (outputs of the last one
    are no longer needed)."""
    import torch

    torch.compiler.cudagraph_mark_step_begin()


def eager():
    """A context in which compiled layers run their plain Python (evaluation and generation:
    shapes that change every token would each record a CUDA graph)."""
    import torch

    return torch.compiler.set_stance("force_eager")


def _chunk_loss(lm_head, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def loss(model, batch: dict, chunk_tokens: int = CHUNK_TOKENS):
    """Mean next-token cross-entropy over labelled positions, computed in checkpointed chunks."""
    import torch
    from torch.utils.checkpoint import checkpoint

    lm = causal_lm(model)
    extra = {k: batch[k] for k in PACKED_KEYS if k in batch}  # a packed batch (no padding mask)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch["input_ids"].is_cuda):
        hidden = lm.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
            **extra,
        ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    hidden, targets = hidden[:, :-1][keep], labels[keep]
    total = hidden.sum().float() * 0.0  # differentiable even when nothing is labelled
    for i in range(0, targets.numel(), chunk_tokens):
        total = total + checkpoint(
            _chunk_loss,
            lm.get_output_embeddings(),
            hidden[i : i + chunk_tokens],
            targets[i : i + chunk_tokens],
            use_reentrant=False,
        )
    return total / max(targets.numel(), 1)
