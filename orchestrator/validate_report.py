"""What ``lorasweep validate`` prints beside "ok": the data's rows, the resolved trial shape and
the money: the base-model eval, the least budget that runs, what the budget buys, and a warning
when not even one full trial fits. Every figure comes from the plan ``run`` checks the budget
with (``orchestrator/preflight.py``), so the least budget printed is the one ``run`` accepts."""

from __future__ import annotations

from orchestrator.preflight import DATA_FIELDS, Plan, usd_up
from orchestrator.spec import Dim, SweepSpec, config_label


def _dim(d: Dim) -> str:
    if d.value is not None:
        return str(d.value)
    if d.choices is not None:
        return "|".join(str(c) for c in d.choices)
    return f"{d.low:g}..{d.high:g}" + (" (log)" if d.log else "")


def data_line(spec: SweepSpec, plan: Plan) -> str:
    counts = [
        f"{plan.row_counts[f]} {f.split('.')[1]}" for f in DATA_FIELDS if f in plan.row_counts
    ]
    return f"  data: {', '.join(counts)} rows ({spec.data.format} format)"


def shape_lines(spec: SweepSpec, plan: Plan) -> list[str]:
    """The trial every config shares, and the search over what differs."""
    s, t, res = spec.search_space, spec.trial, spec.resources
    searched = "; ".join(
        f"{name} {_dim(getattr(s, name))}"
        for name in ("method", "rank", "alpha", "target_modules", "learning_rate", "dropout")
    )
    rung = (
        f"first rung at step {plan.first_rung_steps} (early stopping)"
        if spec.early_stopping.enabled
        else "no early stopping"
    )
    units = f"{res.cpus_per_trial} core(s)" if res.accelerator == "cpu" else f"{res.gpus_per_trial}"
    pack = [plan.pack.line()] if plan.pack is not None else []  # resources.pack_slots
    return [
        f"  search: {searched}",
        f"  trial: {t.max_steps} steps, eval every {t.eval_every}, {rung}; batch {t.batch_size}, "
        f"max_seq_len {t.max_seq_len} (priced at {plan.cost_model.seq_len} tokens a row: the "
        f"longest of the first 64 training rows); {t.eval_examples} eval examples, "
        f"{t.max_new_tokens} new tokens; {res.accelerator} x{units} at "
        f"${plan.price_usd_per_hour:.4f}/h",
        f"  sweep: at most {spec.max_trials} trials, {res.max_concurrent_trials} at a time",
        *pack,
    ]


def money_lines(spec: SweepSpec, plan: Plan) -> list[str]:
    """The base-model eval, the least budget that runs and its parts, what ``budget_usd``
    buys, and the warning when it pays no full trial."""
    t, budget = spec.trial, spec.budget_usd
    evals = len(spec.eval_steps)
    cheapest, dearest = plan.extremes(spec.search_space)
    least = plan.least_budget_usd(spec.search_space)
    lines = [
        f"  base-model eval ${plan.baseline_usd:.6f} (scores {t.eval_examples} validation rows "
        "before the trials; charged to the budget)",
        f"  least budget that runs: {usd_up(least)} (base-model eval ${plan.baseline_usd:.6f} + "
        f"cheapest trial to its first rung ${plan.admission_usd({}, cheapest):.6f} + watchdog "
        f"allowance ${plan.allowance_usd:.6f})",
    ]
    to_rung, full = plan.buys(budget, cheapest, t.max_steps, evals)
    dear_rung, dear_full = plan.buys(budget, dearest, t.max_steps, evals)
    lines.append(
        f"  ${budget:g} buys about {to_rung} trials to the first rung or {full} full trials of "
        f"the cheapest config ({config_label(cheapest)}), {dear_rung} or {dear_full} of the "
        f"dearest ({config_label(dearest)}), one after another"
    )
    one_full = plan.full_trial_budget_usd(cheapest, t.max_steps, evals)
    if one_full > budget:
        lines.append(
            f"  [yellow]warning: not even one full trial[/] fits ${budget:g}: the cheapest "
            f"config's {t.max_steps} steps are predicted "
            f"${plan.trial_usd({}, cheapest, t.max_steps, evals):.6f}, so trials stop at a rung "
            f"when the money runs out; one full trial needs budget_usd >= {usd_up(one_full)}"
        )
    return lines
