"""A sweep's first trial: the config published evidence expects to do best, before any search.

With a small budget the first trial is much of the sweep, and a config drawn at random from a
space one decade either side of good learning rates can spend it learning nothing (on the demo
task a LoRA at lr 1e-4 scores ~0.01 after 30 steps, one at 1.6e-3 ~0.93). So the first trial is
the centre of the priors below, clamped into the user's space; the search (TPE) proposes the
rest, and a user can turn this off (``search_space.first_trial: sampled``).

- Learning rate: ``5e-5 * M * (2000 / hidden_size) ** P``, the fit Thinking Machines publish for
  Llama and Qwen models (tinker-cookbook ``hyperparam_utils.get_lr``, with their "LoRA Without
  Regret", 2025): P = 0.781 for the Llama family, 0.0775 for Qwen; M = 10 for LoRA (the best
  LoRA lr is about 10x the full-FT one), 15 for runs under ~100 steps (short runs favour higher
  rates: "LoRA Without Regret"), 1 for full FT. Families without a published fit take the geometric
  centre of the searched range.
- Rank 16, alpha 32 (the best lr barely moves with rank at fixed alpha), all linear layers
  (they beat attention-only at equal parameter count), dropout 0.05, plain LoRA (no rsLoRA,
  DoRA or LoRA+): the same post's findings; the README's "How the budget is kept" lists them.

Each searched dimension takes the candidate nearest the preferred value (log distance for
positive numbers), or the clamped value in a range.
"""

from __future__ import annotations

import math

from orchestrator.spec import HYPERPARAMETERS, METHODS, TARGET_MODULE_SETS, Dim, SearchSpace

BASE_LR = 5e-5  # full FT at hidden size 2000
LR_HIDDEN_REF = 2000
LR_POWER = {"llama": 0.781, "mistral": 0.781, "qwen2": 0.0775, "qwen3": 0.0775}
LORA_LR_MULTIPLIER = 10.0
SHORT_RUN_LORA_LR_MULTIPLIER = 15.0
SHORT_RUN_STEPS = 100
METHOD_ORDER = METHODS  # preferred first: lora, qlora, full
TARGETS_ORDER = tuple(reversed(TARGET_MODULE_SETS))  # the broadest set first: all_linear, ...
PREFERRED = {
    "rank": 16,
    "alpha": 32,
    "dropout": 0.05,
    "use_rslora": False,
    "use_dora": False,
    "loraplus_lr_ratio": 0,
}


def recommended_lr(method: str, hidden_size: int, model_type: str, max_steps: int) -> float | None:
    """The learning rate the published fit expects to be best (None: no fit for the family)."""
    power = LR_POWER.get(model_type)
    if power is None or hidden_size <= 0:
        return None
    if method == "full":
        multiplier = 1.0
    elif max_steps < SHORT_RUN_STEPS:
        multiplier = SHORT_RUN_LORA_LR_MULTIPLIER
    else:
        multiplier = LORA_LR_MULTIPLIER
    return BASE_LR * multiplier * (LR_HIDDEN_REF / hidden_size) ** power


def _distance(a, b, log: bool) -> float:
    if isinstance(a, (bool, str)) or isinstance(b, (bool, str)):
        return 0.0 if a == b else math.inf
    return abs(math.log(a) - math.log(b)) if log else abs(a - b)


def _pick(dim: Dim, preferred):
    """The value of ``dim`` nearest ``preferred`` (a list: the first of them the dim offers);
    numbers compare on a log scale where all are positive."""
    order = preferred if isinstance(preferred, (list, tuple)) else [preferred]
    if dim.choices is not None:
        numbers = [v for v in [*dim.choices, *order] if not isinstance(v, (bool, str))]
        log = all(v > 0 for v in numbers)
        for want in order:
            best = min(dim.choices, key=lambda c: _distance(c, want, log))
            if _distance(best, want, log) < math.inf:
                return best
        return dim.choices[0]
    return min(max(order[0], dim.low), dim.high)


def _centre(dim: Dim) -> float:
    if dim.choices is not None:
        return sorted(dim.choices)[len(dim.choices) // 2]
    if dim.log:
        return math.sqrt(dim.low * dim.high)
    return (dim.low + dim.high) / 2


def first_config(space: SearchSpace, hidden_size: int, model_type: str, max_steps: int) -> dict:
    """The first trial's values of the dimensions ``space`` searches (fixed ones are left out:
    the trial gets them anyway); empty when nothing is searched."""
    method = space.method.value or _pick(space.method, METHOD_ORDER)
    lr = recommended_lr(method, hidden_size, model_type, max_steps)
    if lr is not None and method == "full":
        lr /= space.full_lr_scale  # the space's rates are LoRA's; full FT runs at lr x the scale
    preferred = {
        **PREFERRED,
        "method": METHOD_ORDER,
        "target_modules": TARGETS_ORDER,
        "learning_rate": lr if lr is not None else _centre(space.learning_rate),
    }
    point = {}
    for name in HYPERPARAMETERS:
        dim = getattr(space, name)
        if dim.value is None:
            point[name] = method if name == "method" else _pick(dim, preferred[name])
    return point
