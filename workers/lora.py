"""LoRA adapters: named target-module sets, and a fresh adapter for each trial.

A trial's adapter starts from weights drawn from its seed alone (``init_adapter``: A
Kaiming-uniform as PEFT does, B zero, layer by layer in module order). That is what makes the
adapter *wrapper* reusable: when a worker's next trial targets the same modules, the PEFT model
of the previous trial is kept and its adapter re-initialised in place (new A/B shapes where the
rank changed; scaling, dropout and the saved config follow the new trial) instead of being
unloaded and injected again, which walks and re-wraps every targeted module (0.17 s on the
2-core CPU, ~0.25 s of Python on the H100 for the 210 layers of the embedded model). A reused
wrapper gives the results of a fresh attach (``tests/test_model_cache.py``). DoRA's magnitude
vectors are derived from the base weights by PEFT, so a DoRA trial always attaches afresh.
"""

from __future__ import annotations

import math

# Named sets (storage-safe for Optuna, unlike lists). Names follow the Llama family; other
# architectures use `all_linear`, which PEFT resolves for any model.
TARGET_MODULES: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attn_mlp": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "all_linear": "all-linear",  # every linear layer except the output head
}

ADAPTER = "default"  # PEFT's name for the one adapter a trial trains
_TARGETS_ATTR = "_lorasweep_targets"  # the named target set a wrapper was built for
stats = {"attached": 0, "reinitialised": 0}


def attach_lora(
    model,
    *,
    rank: int,
    alpha: float,
    target_modules: str,
    dropout: float,
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int = 0,
):
    """``model`` with a freshly initialised LoRA adapter; only adapter weights train. ``model`` is
    a base model, or the PEFT model of an earlier trial (its adapter is replaced: re-initialised
    in place when the targets match, else unloaded first). rsLoRA scales by alpha/sqrt(r) (stable
    at high ranks); DoRA adds a learned magnitude."""
    if hasattr(model, "peft_config"):
        if _reusable(model, target_modules, use_dora):
            _reshape(model, rank, alpha, dropout, use_rslora)
            stats["reinitialised"] += 1
            init_adapter(model, seed)
            return model
        model = model.unload()
    model = _attach(model, rank, alpha, target_modules, dropout, use_rslora, use_dora)
    stats["attached"] += 1
    if not use_dora:  # DoRA's magnitudes were derived from these weights by PEFT: keep them
        init_adapter(model, seed)
    return model


def _attach(model, rank, alpha, target_modules, dropout, use_rslora, use_dora):
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
    model = get_peft_model(model, config)
    setattr(model, _TARGETS_ATTR, target_modules)
    return model


def _layers(model) -> list:
    """The LoRA-wrapped layers of ``model``, in module order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def _reusable(model, target_modules: str, use_dora: bool) -> bool:
    config = model.peft_config.get(ADAPTER)
    return (
        getattr(model, _TARGETS_ATTR, None) == target_modules
        and config is not None
        and len(model.peft_config) == 1
        and not use_dora
        and not config.use_dora
        and not config.lora_bias
    )


def _reshape(model, rank: int, alpha: float, dropout: float, use_rslora: bool) -> None:
    """Give the kept adapter the new trial's rank, scaling and dropout (weights: see
    ``init_adapter``), as PEFT's own ``update_layer`` would for a Linear layer."""
    import torch

    for layer in _layers(model):
        if layer.r[ADAPTER] != rank:
            old = layer.lora_A[ADAPTER].weight
            kw = {"bias": False, "device": old.device, "dtype": old.dtype}
            layer.lora_A[ADAPTER] = torch.nn.Linear(layer.in_features, rank, **kw)
            layer.lora_B[ADAPTER] = torch.nn.Linear(rank, layer.out_features, **kw)
        layer.r[ADAPTER] = rank
        layer.lora_alpha[ADAPTER] = alpha
        layer.scaling[ADAPTER] = alpha / (math.sqrt(rank) if use_rslora else rank)
        layer.use_rslora[ADAPTER] = use_rslora
        layer.lora_dropout[ADAPTER] = (
            torch.nn.Dropout(p=dropout) if dropout > 0.0 else torch.nn.Identity()
        )
    config = model.peft_config[ADAPTER]
    config.r, config.lora_alpha, config.lora_dropout = rank, alpha, dropout
    config.use_rslora = use_rslora


def init_adapter(model, seed: int) -> None:
    """Draw the adapter's starting weights from ``seed``: A Kaiming-uniform (a=sqrt(5), the
    nn.Linear default PEFT uses), B zero, so the adapter starts as the identity update."""
    import torch

    generators: dict = {}  # one stream per device, so the draw does not depend on the layout
    with torch.no_grad():
        for layer in _layers(model):
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if a.device not in generators:
                generators[a.device] = torch.Generator(device=a.device).manual_seed(seed)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generators[a.device])
            torch.nn.init.zeros_(b)
