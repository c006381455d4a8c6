"""LoRA adapters: named target-module sets and attaching a fresh adapter with PEFT."""

from __future__ import annotations

# Named sets (storage-safe for Optuna, unlike lists). Names follow the Llama family; other
# architectures use `all_linear`, which PEFT resolves for any model.
TARGET_MODULES: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attn_mlp": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "all_linear": "all-linear",  # every linear layer except the output head
}


def attach_lora(
    model,
    *,
    rank: int,
    alpha: float,
    target_modules: str,
    dropout: float,
    use_rslora: bool = False,
    use_dora: bool = False,
):
    """Wrap ``model`` with a freshly initialised LoRA adapter; only adapter weights train.
    rsLoRA scales by alpha/sqrt(r) (stable at high ranks); DoRA adds a learned magnitude."""
    from peft import LoraConfig, get_peft_model

    targets = TARGET_MODULES[target_modules]
    if isinstance(targets, list):
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ValueError(
                f"search_space.target_modules: {target_modules!r} needs modules "
                f"{missing} that this model lacks; use all_linear"
            )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    return get_peft_model(model, config)
