"""The staged decision gate and the per-method report on a sweep's parent run."""

from __future__ import annotations

from orchestrator.leaderboard import Row

ADAPTER_METHODS = ("lora", "qlora")


def full_ft_gate(
    *,
    max_runs: int,
    gate: str,
    target_score: float | None,
    best_lora_score: float | None,
    predicted_usd: float,
    remaining_usd: float,
) -> tuple[bool, str]:
    """Whether to run full fine-tuning after the LoRA sweep, and why (or why not)."""
    if max_runs <= 0:
        return False, "full.max_runs is 0"
    if (
        gate == "below_target"
        and best_lora_score is not None
        and target_score is not None
        and best_lora_score >= target_score
    ):
        return False, f"best LoRA score {best_lora_score:.3f} reached target {target_score:g}"
    if predicted_usd > remaining_usd:
        return False, (
            f"a full-FT run to its first rung is predicted at ${predicted_usd:.4f}, "
            f"only ${remaining_usd:.4f} is left"
        )
    if gate == "always":
        return True, "gate: always compare LoRA with full FT"
    best = "none" if best_lora_score is None else f"{best_lora_score:.3f}"
    return True, f"best LoRA score {best} is below target {target_score:g}"


def method_summary(rows: list[Row]) -> dict[str, dict]:
    """Per method: best score, the cost of the trial that reached it, trials and total cost."""
    out: dict[str, dict] = {}
    for r in rows:
        m = out.setdefault(
            r.method,
            {"best_score": None, "best_cost_usd": None, "trials": 0, "total_cost_usd": 0.0},
        )
        m["trials"] += 1
        m["total_cost_usd"] += r.cost_usd
        if r.score is not None and (
            m["best_score"] is None
            or r.score > m["best_score"]
            or (r.score == m["best_score"] and r.cost_usd < m["best_cost_usd"])
        ):
            m["best_score"], m["best_cost_usd"] = r.score, r.cost_usd
    return out


def lora_vs_full(summary: dict[str, dict]) -> str | None:
    """'best LoRA reaches X% of the best full-FT score at Y% of its cost', when both ran."""
    full = summary.get("full")
    adapters = [
        summary[m] for m in ADAPTER_METHODS if summary.get(m, {}).get("best_score") is not None
    ]
    if not full or full["best_score"] is None or not adapters:
        return None
    best = max(adapters, key=lambda m: (m["best_score"], -m["best_cost_usd"]))
    cost_pct = 100 * best["best_cost_usd"] / full["best_cost_usd"] if full["best_cost_usd"] else 0.0
    detail = (
        f"(LoRA {best['best_score']:.3f} for ${best['best_cost_usd']:.5f}; full FT "
        f"{full['best_score']:.3f} for ${full['best_cost_usd']:.5f})"
    )
    if full["best_score"] <= 0:  # no ratio to a zero score
        return (
            f"best LoRA scores {best['best_score']:.3f} where full FT scores 0, at "
            f"{cost_pct:.0f}% of its cost {detail}"
        )
    score_pct = 100 * best["best_score"] / full["best_score"]
    return (
        f"best LoRA reaches {score_pct:.0f}% of the best full-FT score at {cost_pct:.0f}% of "
        f"its cost {detail}"
    )


def pareto_front(rows: list[Row]) -> list[Row]:
    """Trials no other trial beats on both score (higher) and cost (lower), cheapest first."""
    scored = sorted((r for r in rows if r.score is not None), key=lambda r: (r.cost_usd, -r.score))
    front, best = [], float("-inf")
    for r in scored:
        if r.score > best:
            front.append(r)
            best = r.score
    return front


def spend_rows(
    summary: dict[str, dict], baseline_usd: float | None, spent_usd: float | None
) -> list[tuple[str, float]]:
    """What the sweep spent, line by line: each method's trials, the base-model eval, any other
    charge of the ledger (the difference to its ``spent_usd``), so the lines add up to the
    ledger's total."""
    rows = [(f"{method} trials", m["total_cost_usd"]) for method, m in sorted(summary.items())]
    if baseline_usd:
        rows.append(("base-model eval", baseline_usd))
    if spent_usd is not None:
        other = spent_usd - sum(usd for _, usd in rows)
        if abs(other) > 5e-7:  # what the trials' own records and the ledger do not agree on
            rows.append(("other ledger spend (unsettled or not logged)", other))
    return rows


def render_markdown(
    summary: dict[str, dict],
    line: str | None,
    gate_reason: str,
    skipped: list[str],
    baseline_usd: float | None = None,
    spent_usd: float | None = None,
) -> str:
    """The parent run's report.md. ``baseline_usd`` is the base-model eval's charge and
    ``spent_usd`` the ledger's total: the spend table adds up to it."""
    lines = [
        "# Method report",
        "",
        "| method | trials | best score | cost of best (USD) | total cost (USD) |",
        "|---|---|---|---|---|",
    ]
    for method, m in sorted(summary.items()):
        best = "-" if m["best_score"] is None else f"{m['best_score']:.3f}"
        cost = "-" if m["best_cost_usd"] is None else f"{m['best_cost_usd']:.5f}"
        lines.append(f"| {method} | {m['trials']} | {best} | {cost} | {m['total_cost_usd']:.5f} |")
    spend = spend_rows(summary, baseline_usd, spent_usd)
    total = spent_usd if spent_usd is not None else sum(usd for _, usd in spend)
    lines += ["", "## Spend", "", "| what | USD |", "|---|---|"]
    lines += [f"| {what} | {usd:.5f} |" for what, usd in spend]
    lines.append(f"| **total spent** | **{total:.5f}** |")
    lines += ["", f"Full fine-tuning: {gate_reason}."]
    if line:
        lines += ["", line[0].upper() + line[1:] + "."]
    if skipped:
        lines += ["", "Configurations never launched (memory):", *[f"- {s}" for s in skipped]]
    return "\n".join(lines) + "\n"
