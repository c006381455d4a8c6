"""LoRA adapters: target-module sets (named, or raw module lists), a fresh adapter per trial.

A trial's ``target_modules`` is a named set (``qv``, ``attn``, ``mlp``, ``attn_mlp``,
``all_linear``) or a raw PEFT-style list of module names, carried as one string (Optuna's
categoricals and MLflow params take strings, not lists): the sorted names joined by ``+``,
``q_proj+v_proj`` (:func:`raw_target_key`). ``TARGET_MODULES[key]`` gives the module names of
either.

A trial's adapter starts from weights drawn from its seed alone (``init_adapter``: A
Kaiming-uniform as PEFT does, B zero, layer by layer in module order), so how the adapter came
to be does not matter, and a worker keeps its PEFT model between trials (``model_cache``). Each
named target set is one PEFT adapter of that model, named after the set (``lorasweep_attn``):

- a trial on a set seen before re-initialises that adapter in place (new A/B shapes where the
  rank changed; scaling, dropout and the saved config follow the trial);
- a new set is added once (``add_adapter``);
- only the trial's adapter is active and trainable; the others wait at rank 1 (no memory of note).

Injecting an adapter walks and re-wraps every targeted module (0.17 s on the 2-core CPU, 0.2-0.5 s
of Python on the H100 for the 210 layers of the embedded model, plus ~0.05 s to unload it): a
reused worker pays that once per target set instead of once per trial. Results equal a fresh
attach on a freshly loaded base (``tests/test_model_cache.py``). DoRA's magnitude vectors are
derived from the base weights by PEFT, so a DoRA trial starts from the bare base model (kept
adapters are unloaded first) and keeps PEFT's initialisation.

``save_adapter`` writes what PEFT's ``save_pretrained`` writes for an adapter named "default"
(``adapter_config.json``, ``adapter_model.safetensors``), for whichever adapter is active.
"""

from __future__ import annotations

import contextlib
import math
import re

RAW_SEPARATOR = "+"  # joins a raw module list into one storage-safe string
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)  # matched as PEFT does: last part


def raw_target_key(modules: list[str]) -> str:
    """The one string a raw module list travels as: sorted, without repeats, ``+``-joined."""
    return RAW_SEPARATOR.join(sorted(set(modules)))


def raw_modules(key: str) -> list[str] | None:
    """The module names of a raw key (``q_proj+v_proj``), or None if ``key`` is not one."""
    if not isinstance(key, str) or not key:
        return None
    names = key.split(RAW_SEPARATOR)
    return names if all(MODULE_NAME.fullmatch(n) for n in names) else None


class _TargetSets(dict):
    """Named sets by name; any other key that is a raw module list gives its names."""

    def __missing__(self, key: str) -> list[str]:
        names = raw_modules(key)
        if names is None:
            raise KeyError(key)
        return names

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or raw_modules(key) is not None  # type: ignore[arg-type]

    def get(self, key, default=None):
        return self[key] if key in self else default


# Named sets. Names follow the Llama family; other architectures use `all_linear`, which PEFT
# resolves for any model, or a raw list of their own module names.
TARGET_MODULES: dict[str, list[str] | str] = _TargetSets(
    {
        "qv": ["q_proj", "v_proj"],
        "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
        "attn_mlp": ["q_proj", "v_proj", "up_proj", "down_proj"],
        "all_linear": "all-linear",  # every linear layer except the output head
    }
)

# PEFT finds an adapter's weights by ".<name>." in parameter names: a prefix no module name has
ADAPTER_PREFIX = "lorasweep_"
PARKED_RANK = 1  # adapters of other target sets wait at this rank (next to no memory)
_SET_ATTR = "_lorasweep_adapter"  # the active adapter's name
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
    """``model`` with a freshly initialised LoRA adapter active; only its weights train.
    ``model`` is a base model or the PEFT model of an earlier trial (see the module's docstring).
    rsLoRA scales by alpha/sqrt(r) (stable at high ranks); DoRA adds a learned magnitude."""
    from peft import LoraConfig, get_peft_model

    name = ADAPTER_PREFIX + target_modules
    kept = hasattr(model, "peft_config")
    if kept and (use_dora or any(c.use_dora for c in model.peft_config.values())):
        model, kept = model.unload(), False
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=TARGET_MODULES[target_modules],
        task_type="CAUSAL_LM",
        bias="none",
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    if kept and name in model.peft_config:
        _reshape(model, name, rank, alpha, dropout, use_rslora)
        stats["reinitialised"] += 1
    else:
        _check_targets(model, target_modules)
        if kept:
            model.add_adapter(name, config)
        else:
            model = get_peft_model(model, config, adapter_name=name)
        stats["attached"] += 1
    for other in model.peft_config:
        if other != name and model.peft_config[other].r != PARKED_RANK:
            _reshape(model, other, PARKED_RANK, 1.0, 0.0, False)
    model.set_adapter(name)  # the others: inactive, frozen
    setattr(model, _SET_ATTR, name)
    if not use_dora:  # DoRA's magnitudes were derived from PEFT's draw: keep it
        init_adapter(model, seed)
    return model


def linear_module_names(model) -> list[str]:
    """The names (last part, as PEFT matches them) of ``model``'s linear layers that LoRA can
    target: every ``nn.Linear`` (4-bit ones included) or GPT-2 ``Conv1D`` but the output head;
    sorted. Layers already wrapped by PEFT count under their own name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or module is head:
            continue
        if parts[-1] == "base_layer":  # PEFT's wrapper keeps the original under base_layer
            parts = parts[:-1]
        if parts[-1] and _is_linear(module):
            names.add(parts[-1])
    return sorted(names)


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def missing_modules(model, target_modules: str) -> list[str]:
    """The modules of target set ``target_modules`` (named or raw) that ``model`` has no
    linear layer for; ``all_linear`` misses nothing where the model has a linear layer."""
    targets = TARGET_MODULES[target_modules]
    linear = linear_module_names(model)
    if isinstance(targets, str):  # all-linear
        return [] if linear else [target_modules]
    return [t for t in targets if t not in linear]


def _check_targets(model, target_modules: str) -> None:
    missing = missing_modules(model, target_modules)
    if missing:
        raise ValueError(
            f"search_space.target_modules: {target_modules!r} needs modules {missing} that "
            f"this model lacks; its linear modules are {linear_module_names(model)}; use "
            "all_linear or a list of those"
        )


def _layers(model, name: str) -> list:
    """The layers holding adapter ``name``, in module order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]


def _reshape(model, name: str, rank: int, alpha: float, dropout: float, use_rslora: bool) -> None:
    """Give adapter ``name`` a rank, scaling and dropout (its weights: ``init_adapter``), as
    PEFT's own ``update_layer`` does for a Linear layer."""
    import torch

    for layer in _layers(model, name):
        if layer.r[name] != rank:
            old = layer.lora_A[name].weight
            kw = {"bias": False, "device": old.device, "dtype": old.dtype}
            layer.lora_A[name] = torch.nn.Linear(layer.in_features, rank, **kw)
            layer.lora_B[name] = torch.nn.Linear(rank, layer.out_features, **kw)
        layer.r[name] = rank
        layer.lora_alpha[name] = alpha
        layer.scaling[name] = alpha / (math.sqrt(rank) if use_rslora else rank)
        layer.use_rslora[name] = use_rslora
        layer.lora_dropout[name] = (
            torch.nn.Dropout(p=dropout) if dropout > 0.0 else torch.nn.Identity()
        )
    config = model.peft_config[name]
    config.r, config.lora_alpha, config.lora_dropout = rank, alpha, dropout
    config.use_rslora = use_rslora


def init_adapter(model, seed: int) -> None:
    """Draw the active adapter's starting weights from ``seed``: A Kaiming-uniform (a=sqrt(5),
    the nn.Linear default PEFT uses), B zero, so the adapter starts as the identity update."""
    import torch

    generators: dict = {}  # one stream per device, so the draw does not depend on the layout
    name = getattr(model, _SET_ATTR)
    with torch.no_grad():
        for layer in _layers(model, name):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            if a.device not in generators:
                generators[a.device] = torch.Generator(device=a.device).manual_seed(seed)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generators[a.device])
            torch.nn.init.zeros_(b)


def save_adapter(model, out_dir) -> None:
    """The active adapter as PEFT saves an adapter named "default": its config (in inference
    mode) and its weights, keys without the adapter's name."""
    import copy
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    name = getattr(model, _SET_ATTR)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=name)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    if config.base_model_name_or_path is None:  # an added adapter: PEFT fills it in on saving
        config.base_model_name_or_path = model.get_base_model().__dict__.get("name_or_path")
    config.save_pretrained(str(out))


# devices where evaluation runs with the adapter merged into the base weights: a merged LoRA layer
# is one matmul instead of six kernels (casts, A, B, scale, add). On a GPU a small model's eval is
# bound by kernel launches, and the decoding step's CUDA graph shrinks; on a CPU the extra
# elementwise passes over every layer's output cost a little more than merging and restoring (demo
# model, 1 thread: 16 rows x 80 tokens 12.3-12.6 s merged, merging included, against 12.7-13.1 s)
MERGE_FOR_EVAL_DEVICES = {"cuda", "cpu"}
MERGE_MEMORY_FACTOR = 2.0  # merge only when free memory holds this many copies of the weights


def _merge_candidates(model) -> list:
    """The layers of the active plain-LoRA adapter whose base weights can be merged into and
    restored exactly (floating-point weights; not DoRA, not 4-bit); empty where not worth it."""
    if not hasattr(model, "peft_config") or not hasattr(model, _SET_ATTR):
        return []
    name = getattr(model, _SET_ATTR)
    config = model.peft_config.get(name)
    if config is None or config.use_dora:
        return []
    layers = _layers(model, name)
    weights = [layer.get_base_layer().weight for layer in layers]
    if not weights or weights[0].device.type not in MERGE_FOR_EVAL_DEVICES:
        return []
    if any(not w.dtype.is_floating_point for w in weights):
        return []  # quantized (QLoRA): merging would not round-trip
    needed = sum(w.numel() * w.element_size() for w in weights)
    if _free_bytes(weights[0].device) < MERGE_MEMORY_FACTOR * needed:
        return []
    return layers


def _free_bytes(device) -> float:
    """Memory free for the copy of the weights: the GPU's, or the machine's available RAM."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not reported (not Linux): merge anyway
        return math.inf


@contextlib.contextmanager
def merged_for_eval(model):
    """Within the block, the active adapter is merged into the base weights (PEFT ``merge``, in
    place); after it, the base weights are exactly what they were (restored in place from a copy,
    not by subtracting the update, which would not round-trip in bf16). Numerics differ from the
    unmerged forward by the rounding of the merged weights only. Yields whether it merged."""
    import torch

    layers = _merge_candidates(model)
    name = getattr(model, _SET_ATTR, None)
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                saved.append((layer, weight.detach().clone()))
                layer.merge(adapter_names=[name])
        yield bool(saved)
    finally:
        with torch.no_grad():
            for layer, original in saved:
                layer.get_base_layer().weight.copy_(original)
                layer.merged_adapters.clear()
