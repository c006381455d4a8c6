"""``search_space.target_modules`` checked against the model, before anything is spent.

A named set needs every module it names (``all_linear``: any linear layer but the output head); a
raw module list needs each of its names to be a linear layer of the model (the last part of a name
in ``model.named_modules()``, as PEFT matches ``target_modules``). The model may be built on the
meta device: only module names and types are read.
"""

from __future__ import annotations

from orchestrator.errors import SpecError
from orchestrator.spec import SearchSpace

FIELD = "search_space.target_modules"


def check_target_modules(space: SearchSpace, model) -> None:
    """Refuse a space that can propose target modules ``model`` lacks (so TPE never proposes
    them), naming the field, each bad set or module, the model's linear module names and the
    choices to keep. Full fine-tuning only: nothing to check."""
    from workers.lora import TARGET_MODULES, linear_module_names, missing_modules, raw_modules

    if not [m for m in space.method.candidates() if m != "full"]:
        return
    candidates = space.target_modules.candidates()
    problems, keep = [], []
    for key in candidates:
        missing = missing_modules(model, key)
        if not missing:
            keep.append(key)
        elif raw_modules(key) is not None and key not in TARGET_MODULES.keys():
            listed = ", ".join(raw_modules(key))
            problems.append(f"module {', '.join(map(repr, missing))} (of [{listed}])")
        else:
            problems.append(f"set {key!r} (needs {missing})")
    if not problems:
        return
    linear = linear_module_names(model)
    named = [k for k in TARGET_MODULES if not missing_modules(model, k)]
    fix = [_as_written(k) for k in keep] or ["all_linear"]
    raise SpecError(
        FIELD,
        f"this model has no {'; no '.join(problems)} (from your spec or its preset). Its linear "
        f"modules are {linear}; the named sets it has are {named}. Set {FIELD}: "
        f"{{choices: {fix}}}, or list modules of its own, e.g. [{', '.join(linear[:2])}]",
    )


def _as_written(key: str):
    from workers.lora import TARGET_MODULES, raw_modules

    return key if key in TARGET_MODULES.keys() else raw_modules(key)
