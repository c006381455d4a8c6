"""What the MLflow UI shows a person: run descriptions (``mlflow.note.content``, markdown) for a
sweep's parent run and its trials, and dollar amounts also in cents.

The MLflow UI prints a metric under 0.001 as ``4.460e-5`` and rounds the rest to three decimals
(``Utils.formatMetric`` in its JS bundle): a CPU trial's $0.00006 or a sweep's $0.0012 reads badly.
Every ``*_usd`` metric and number param therefore gets a ``*_cents`` twin (x100, same step);
the ``*_usd`` keys stay as they are (the leaderboard, promote and the API read them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

NOTE_TAG = "mlflow.note.content"  # the run's "Description" in the MLflow UI
_USD = re.compile(r"(^|_)usd(_|$)")


def cents_key(key: str) -> str | None:
    """The cents twin of a dollar key (``cost_usd`` -> ``cost_cents``, ``price_usd_per_hour`` ->
    ``price_cents_per_hour``, ``best_cost_usd_lora`` -> ``best_cost_cents_lora``), None for a key
    that is not in dollars."""
    return _USD.sub(r"\1cents\2", key, count=1) if _USD.search(key) else None


def with_cents(values: Mapping[str, object]) -> dict[str, object]:
    """``values`` plus a ``*_cents`` twin of every numeric ``*_usd`` value (one already given
    is kept)."""
    out = dict(values)
    for key, value in values.items():
        twin = cents_key(key)
        if twin is None or twin in values or isinstance(value, bool):
            continue
        try:
            out[twin] = round(float(value) * 100.0, 6)  # a micro-cent is below any price
        except (TypeError, ValueError):
            continue
    return out


def money(usd: float | None) -> str:
    """``$12.34``; below a dollar also in cents, ``$0.00123 (0.123 cents)``."""
    if usd is None:
        return "-"
    if abs(usd) >= 1:
        return f"${usd:,.2f}"
    return f"${usd:.3g} ({usd * 100:.3g} cents)" if usd else "$0"


def config_summary(p: Mapping[str, object]) -> str:
    """One line of what a trial runs: ``lora r8 alpha 16 attn_mlp lr 1.00e-03 use_rslora``.
    Takes the trial's params as the driver holds them or as MLflow returns them (strings)."""
    method = str(p.get("method", "?"))
    lr = _number(p.get("learning_rate"))
    lr_text = "?" if lr is None else f"{lr:.2e}"
    if method == "full":
        return f"full lr {lr_text}"
    extras = [k for k in ("use_rslora", "use_dora") if _flag(p.get(k))]
    ratio = _number(p.get("loraplus_lr_ratio"))
    if ratio:
        extras.append(f"lora+ x{ratio:g}")
    alpha = _number(p.get("alpha"))
    return (
        f"{method} r{p.get('rank', '?')} alpha {'?' if alpha is None else f'{alpha:g}'} "
        f"{p.get('target_modules', '?')} lr {lr_text} {' '.join(extras)}"
    ).rstrip()


def sweep_note(
    sweep_id: str,
    status: str,
    *,
    budget_usd: float | None,
    spent_usd: float | None = None,
    trials: int | None = None,
    best: tuple[str, str] | None = None,
    end_reason: str = "",
    model: str = "",
    objective: str = "",
) -> str:
    """The parent run's description: what to do next first (the UI shows a description's first
    lines, the rest behind "Show more"), then budget, spent, trials, the best trial (``best``:
    its name and a line about it) and why it ended."""
    promote = f"`lorasweep promote {sweep_id}`"
    head = f"**Sweep `{sweep_id}`: {status}.**"
    if status == "running":
        head += f" When it ends, {promote} registers its best trial's adapter as `champion`."
    elif status in ("completed", "interrupted") and best:
        head += f" Best: {best[0]}. Promote it (alias `champion`): {promote}"
    elif status == "interrupted":
        head += f" Continue it: `lorasweep resume {sweep_id}`"
    lines = [head, ""]
    if spent_usd is not None:
        lines += [f"Spent {money(spent_usd)} of {money(budget_usd)}.", ""]
    lines += ["| | |", "|---|---|", f"| Budget | {money(budget_usd)} |"]
    if spent_usd is not None:
        lines.append(f"| Spent | {money(spent_usd)} |")
    if trials is not None:
        lines.append(f"| Trials | {trials} |")
    if best:
        lines.append(f"| Best | {best[1]} |")
    if end_reason:
        lines.append(f"| Ended | {end_reason} |")
    if model or objective:
        lines += ["", f"Model `{model}`, ranked by {objective}."]
    return "\n".join(lines)


def trial_note(
    name: str,
    status: str,
    summary: str,
    *,
    cost_usd: float | None = None,
    predicted_usd: float | None = None,
    billed_s: float | None = None,
    score: str = "",
    error: str = "",
) -> str:
    """A trial's description: its status and cost (or predicted cost) first, what it runs, the
    eval it kept, and its error."""
    if cost_usd is not None:
        billed = f", {billed_s:.0f} s billed" if billed_s is not None else ""
        cost = f"cost {money(cost_usd)}{billed}"
    else:
        cost = "predicted cost " + money(predicted_usd) if predicted_usd is not None else ""
    lines = [f"**{name}: {status}**" + (f", {cost}." if cost else ""), "", summary]
    if score:
        lines += ["", score]
    if error:
        lines += ["", f"Error: {error.splitlines()[0][:500]}"]
    return "\n".join(lines)


def _number(value: object) -> float | None:
    try:
        return None if value in (None, "", "None") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _flag(value: object) -> bool:
    return value is True or str(value).lower() == "true"
