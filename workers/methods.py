"""The three training methods, each a short recipe: load the base model, decide what trains.

- ``lora``: frozen base in the compute dtype + a LoRA adapter (options: rsLoRA, DoRA, LoRA+).
- ``qlora``: frozen base quantised to 4-bit NF4 with double quantisation and bf16 compute
  (bitsandbytes, CUDA only) + a LoRA adapter.
- ``full``: every weight trains (bf16 on GPU).

Each returns the model and the optimizer's parameter groups; a group's ``lr_scale`` multiplies
the scheduled learning rate (LoRA+ trains the B matrices ``loraplus_lr_ratio`` times faster).
"""

from __future__ import annotations

from workers import model_cache
from workers.lora import attach_lora
from workers.model import load_base_model

METHODS = ("lora", "qlora", "full")


class MethodError(Exception):
    """A method cannot run here; the message names the field and the fix."""


def _param_groups(model, loraplus_lr_ratio: float | None) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not loraplus_lr_ratio:
        return [{"params": [p for _, p in trainable], "lr_scale": 1.0}]
    b = [p for n, p in trainable if "lora_B" in n]
    rest = [p for n, p in trainable if "lora_B" not in n]
    return [{"params": rest, "lr_scale": 1.0}, {"params": b, "lr_scale": float(loraplus_lr_ratio)}]


def _enable_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # frozen embeddings: let gradients reach layer inputs


def _with_adapter(model, cfg):
    import torch

    torch.manual_seed(cfg.seed)  # DoRA's fresh attach draws from the global generator
    model = attach_lora(
        model,
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=cfg.target_modules,
        dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        seed=cfg.seed,
    )
    # a fresh attach drew from the global generator, a reused adapter did not: reseed, so
    # dropout and everything after draw the same either way
    torch.manual_seed(cfg.seed)
    return model, _param_groups(model, cfg.loraplus_lr_ratio)


def cache_key(cfg) -> tuple | None:
    """What identifies a reusable base model (None: this method never reuses one)."""
    if cfg.method == "full":
        return None
    # compiled layers (CUDA graphs, static shapes) stay compiled: only a compiled trial reuses them
    return (cfg.method, cfg.model, cfg.dtype, cfg.device, bool(cfg.compile))


def setup_lora(cfg):
    model = model_cache.acquire(
        cache_key(cfg), lambda: load_base_model(cfg.model, cfg.dtype, cfg.device)
    )
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    return _with_adapter(model, cfg)


def setup_qlora(cfg):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cfg.device != "cuda" or not torch.cuda.is_available():
        raise MethodError(
            "search_space.method: qlora needs a CUDA GPU (bitsandbytes 4-bit); "
            "use lora on CPU or set resources.accelerator to a GPU"
        )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = model_cache.acquire(
        cache_key(cfg),
        lambda: AutoModelForCausalLM.from_pretrained(
            cfg.model,
            quantization_config=quant,
            dtype=torch.bfloat16,
            device_map={"": 0},
            attn_implementation="sdpa",
        ),
    )
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    return _with_adapter(model, cfg)


def setup_full(cfg):
    model_cache.clear()  # full FT changes every weight: it never reuses, and needs the memory
    model = load_base_model(cfg.model, cfg.dtype, cfg.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(True)
    return model, _param_groups(model, None)


def setup_model(cfg):
    """(model, param_groups) for ``cfg.method``."""
    recipes = {"lora": setup_lora, "qlora": setup_qlora, "full": setup_full}
    if cfg.method not in recipes:
        raise MethodError(f"search_space.method: unknown method {cfg.method!r}; use {METHODS}")
    return recipes[cfg.method](cfg)
