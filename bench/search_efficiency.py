"""Search efficiency at equal dollar budgets: replaying strategies against recorded curves.

    python3 bench/search_efficiency.py            # ~2 min on 2 cores, no GPU
    python3 bench/search_efficiency.py --seeds 20 --out bench/results/search_efficiency.json
    python3 bench/search_efficiency.py --table bench/data/curves-v2.json \
        --out bench/results/search_efficiency_v2.json   # the second table (v2 grid)

The table (``bench/data/curves.json``, made by ``bench/record_curves.py``) holds, for 48 LoRA
configs and 4 full-FT runs of the demo task, the score and billed cost at every eval. A strategy
"runs" a config by reading its curve: it pays the cost up to the last eval it reaches and may use
the adapter saved at any eval it reached. Trials run one at a time.

Every strategy searches the same space, read from the table (``Table.space``): method
(lora | full), learning-rate level (full FT uses the table's full-FT rate of the same level),
rank and target modules (rank and targets mean nothing to full FT). In ``curves.json``: 4 levels
(full FT ~20x lower), ranks 4/8/16/64, attn/attn_mlp/all_linear; in ``curves-v2.json``: 6 levels
(full FT 10x lower), ranks 4/16/64, the same targets.

- ``random``: random configs, each run to the end, launched while spent < budget (the usual
  "stop when the budget is gone" rule: the last trial may overrun).
- ``tpe``: Optuna's TPE (defaults), no early stopping, same launch rule.
- ``asha_random``: random configs + ASHA as Ray Tune's defaults set it (grace 1 report, reduction
  factor 4), same launch rule.
- ``lorasweep``: this project's engine: the real ``Ledger`` (admission of the cheapest config,
  then the proposed config's own prediction from the real ``CostModel``, calibrated from what ran;
  a ceiling raised before each interval or the trial closes), the real ``CostAwareTPESampler``
  (EI per dollar), stopped trials told to Optuna as PRUNED, and ASHA with the spec's defaults
  (first rung at >= 30% of max steps, reduction factor 3).

Simple regret = best score in the table - best score the strategy found (any eval of any trial).
lorasweep's first trial is the priors' config (``orchestrator.priors``, as a sweep's is by default),
mapped to the table's grid; ``--first-trial sampled`` lets the sampler propose it instead.
Writes rows {"budget_fraction", "strategy", "median_regret", "iqr_regret", "spent_fraction",
"overruns"} and a second file with the smallest budget at which each strategy's median result is
within 1% of the best score in the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = ("random", "tpe", "asha_random", "lorasweep")
FRACTIONS = (0.1, 0.25, 0.5)
TARGET_FRACTIONS = (
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.045,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
)


def _rates(raw: dict, method: str) -> list[float]:
    """The learning rates a table recorded for ``method``, ascending (index = level)."""
    return sorted({c["learning_rate"] for c in raw["configs"] if c["method"] == method})


@dataclass
class Table:
    configs: dict[tuple, dict]  # (method, lr level, rank, targets) -> config row with its curve
    raw: dict

    @classmethod
    def load(cls, path: Path) -> Table:
        raw = json.loads(path.read_text())
        lora_lrs, full_lrs = _rates(raw, "lora"), _rates(raw, "full")
        configs = {}
        for c in raw["configs"]:
            if c["method"] == "full":
                configs[("full", full_lrs.index(c["learning_rate"]))] = c
            else:
                key = ("lora", lora_lrs.index(c["learning_rate"]), c["rank"], c["target_modules"])
                configs[key] = c
        return cls(configs, raw)

    def row(self, hp: dict) -> dict:
        if hp["method"] == "full":
            return self.configs[("full", hp["lr"])]
        return self.configs[("lora", hp["lr"], hp["rank"], hp["target_modules"])]

    @property
    def oracle(self) -> float:
        return max(p["score"] for c in self.configs.values() for p in c["curve"])

    @property
    def grid_cost_usd(self) -> float:
        return sum(c["curve"][-1]["cost_usd"] for c in self.configs.values())

    @property
    def reports(self) -> int:
        return len(next(iter(self.configs.values()))["curve"])

    def space(self) -> dict[str, list]:
        """The searched space, as the table recorded it: method, learning-rate level (LoRA's
        levels, and full FT's of the same index), rank and target modules."""
        from workers.lora import TARGET_MODULES  # its named sets, in their order

        lora = [k for k in self.configs if k[0] == "lora"]
        levels = sorted({k[1] for k in lora})
        full = sorted(k[1] for k in self.configs if k[0] == "full")
        if full and full != levels:
            raise ValueError(f"the table has {len(full)} full-FT rates for {len(levels)} LoRA ones")
        return {
            "method": sorted({k[0] for k in self.configs}, key=["lora", "full"].index),
            "lr": levels,
            "rank": sorted({k[2] for k in lora}),
            "target_modules": sorted({k[3] for k in lora}, key=list(TARGET_MODULES).index),
        }


def suggest(trial, table: Table) -> dict:
    return {name: trial.suggest_categorical(name, c) for name, c in table.space().items()}


@dataclass
class Outcome:
    spent_usd: float = 0.0
    best_score: float = 0.0
    trials: int = 0
    log: list = field(default_factory=list)

    def reached(self, row: dict, upto: int) -> None:
        """The trial reported evals 0..upto (inclusive)."""
        self.best_score = max([self.best_score] + [p["score"] for p in row["curve"][: upto + 1]])


class Asha:
    """ASHA's rule as Ray Tune's ASHAScheduler applies it (one bracket): at a rung, a trial stops
    if its score is below the (1 - 1/rf) quantile of the scores recorded at that rung so far."""

    def __init__(self, grace: int, rf: int, max_t: int) -> None:
        self.rf = rf
        self.rungs: dict[int, list[float]] = {}
        t = grace
        while t < max_t:
            self.rungs[t] = []
            t *= rf

    def keep_going(self, reports: int, score: float) -> bool:
        recorded = self.rungs.get(reports)
        if recorded is None:
            return True
        cutoff = np.percentile(recorded, (1 - 1 / self.rf) * 100) if recorded else None
        recorded.append(score)
        return cutoff is None or score >= cutoff


def run_plain(table: Table, budget: float, seed: int, sampler, asha_kwargs: dict | None) -> Outcome:
    """random / tpe / asha_random: launch while spent < budget, no prediction, no ceiling."""
    import optuna

    study = optuna.create_study(direction="maximize", sampler=sampler)
    out = Outcome()
    asha = Asha(**asha_kwargs, max_t=table.reports) if asha_kwargs else None
    while out.spent_usd < budget:
        trial = study.ask()
        row = table.row(suggest(trial, table))
        last = table.reports - 1
        for k, point in enumerate(row["curve"]):
            trial.report(point["score"], k + 1)
            if asha and k < table.reports - 1 and not asha.keep_going(k + 1, point["score"]):
                last = k
                break
        out.spent_usd += row["curve"][last]["cost_usd"]
        out.reached(row, last)
        out.trials += 1
        # what Ray's OptunaSearch does: every trial that ends is told COMPLETE with its last value
        study.tell(trial, row["curve"][last]["score"])
    return out


def _engine_cost_model(table: Table):
    from orchestrator.costmodel import CostModel, ModelDims
    from workers.memory import ModelShape

    dims = ModelDims.from_shape(ModelShape(**table.raw["model_shape"]))
    return CostModel(
        price_usd_per_hour=table.raw["price_usd_per_hour"],
        accelerator=table.raw["accelerator"],
        units=1,
        dims=dims,
        seq_len=table.raw["seq_len_tokens"],
        batch_size=table.raw["batch_size"],
        eval_batches=-(-table.raw["eval_examples"] // table.raw["batch_size"]),
    )


def _measured(row: dict) -> dict:
    """What the engine learns from a trial's first report: step, closing and startup seconds."""
    p, first = row["phases_s"], row["curve"][0]
    steps = row["curve"][-1]["step"]
    step_s = p["step"] / steps
    closing_s = (p["eval"] + p["checkpoint"]) / len(row["curve"])
    return {
        "step_s": step_s,
        "closing_s": closing_s,
        "startup_s": max(first["billed_s"] - first["step"] * step_s - closing_s, 0.0),
    }


def first_point(table: Table) -> dict:
    """The sweep's first trial (``orchestrator.priors``) on the table's grid: the space the table
    recorded, as a spec's search space, and the chosen learning rate as its level."""
    from orchestrator.priors import first_config
    from orchestrator.spec import Dim, SearchSpace

    space, raw = table.space(), table.raw
    lora_lrs, full_lrs = _rates(raw, "lora"), _rates(raw, "full")
    search = SearchSpace(
        method=Dim(choices=space["method"]),
        learning_rate=Dim(choices=lora_lrs),
        rank=Dim(choices=space["rank"]),
        target_modules=Dim(choices=space["target_modules"]),
        full_lr_scale=(  # a table without full FT: the spec's default scale
            statistics.geometric_mean(f / lo for f, lo in zip(full_lrs, lora_lrs, strict=True))
            if full_lrs
            else SearchSpace().full_lr_scale
        ),
    )
    shape = raw["model_shape"]
    point = first_config(search, shape["hidden"], "llama", raw["max_steps"])  # a Llama shape
    return {
        "method": point["method"],
        "lr": lora_lrs.index(point["learning_rate"]),
        "rank": point["rank"],
        "target_modules": point["target_modules"],
    }


def _hp(hp: dict) -> dict:
    """The cost model's view of a replay config."""
    return {"method": hp["method"], "rank": hp["rank"], "target_modules": hp["target_modules"]}


def run_lorasweep(table: Table, budget: float, seed: int, **engine) -> Outcome:
    """``engine`` overrides for ablations: grace_fraction, reduction_factor, cost_power,
    n_startup_trials (defaults: the spec's and the sweep's)."""
    import optuna
    from optuna.trial import TrialState

    from orchestrator.acquisition import CostAwareTPESampler
    from orchestrator.budget import Ledger
    from orchestrator.costmodel import SAFETY
    from orchestrator.spec import EarlyStoppingSpec

    model = _engine_cost_model(table)
    ledger = Ledger(cap_usd=budget)
    steps, every = table.raw["max_steps"], table.raw["eval_every"]
    es = EarlyStoppingSpec()
    grace_fraction = engine.get("grace_fraction", es.grace_fraction)
    grace = next(i for i in range(1, table.reports + 1) if i * every >= grace_fraction * steps)
    asha = Asha(grace, engine.get("reduction_factor", es.reduction_factor), table.reports)

    def seconds(hp: dict) -> float:
        return model.seconds(_hp(hp), steps, table.reports, ledger.get_timings())

    sampler = CostAwareTPESampler(
        cost_of=seconds,
        seed=seed,
        cost_power=engine.get("cost_power", 1.0),
        n_startup_trials=engine.get("n_startup_trials", 4),
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if engine.get("first_trial", "prior") == "prior":
        study.enqueue_trial(first_point(table))
    cheapest = {"method": "lora", "rank": 4, "target_modules": "attn"}
    out = Outcome()
    while True:
        tid = f"t{out.trials}"
        first_rung = model.usd(cheapest, every, 1, ledger.get_timings())
        if not ledger.reserve(tid, first_rung):
            break  # the cheapest trial's first rung no longer fits: the sweep ends
        trial = study.ask()
        hp = suggest(trial, table)
        admission = model.usd(_hp(hp), every, 1, ledger.get_timings())
        if not ledger.resize(tid, admission):
            ledger.settle(tid, 0.0)
            study.tell(trial, state=TrialState.FAIL)  # never launched: nothing spent
            out.trials += 1
            continue
        row = table.row(hp)
        curve, reached, spent, state = row["curve"], -1, 0.0, TrialState.COMPLETE
        for k, point in enumerate(curve):
            if point["cost_usd"] > ledger.ceiling(tid):
                # the worker asks for this interval's cost with the engine's safety margin
                need = spent + SAFETY * (point["cost_usd"] - spent)
                if not ledger.request(tid, need):
                    # refused: the worker trains on only while a step and its closing fit, then
                    # closes inside the ceiling; the partial interval is paid, not credited
                    spent = min(ledger.ceiling(tid), point["cost_usd"])
                    state = TrialState.PRUNED
                    break
            spent, reached = point["cost_usd"], k
            ledger.update(tid, spent)
            trial.report(point["score"], k + 1)
            if k == 0:
                m = _measured(row)
                ledger.calibrate(
                    **model.calibration(_hp(hp), m["step_s"]),
                    closing_s=m["closing_s"],
                    startup_s=m["startup_s"],
                )
            if k < len(curve) - 1 and not asha.keep_going(k + 1, point["score"]):
                state = TrialState.PRUNED
                break
        ledger.settle(tid, spent)
        out.spent_usd += spent
        out.trials += 1
        if reached >= 0:
            out.reached(row, reached)
        if state == TrialState.COMPLETE:
            study.tell(trial, curve[-1]["score"])
        else:
            study.tell(trial, state=TrialState.PRUNED)
    return out


def run(strategy: str, table: Table, budget: float, seed: int, **engine) -> Outcome:
    import optuna

    if strategy == "lorasweep":
        return run_lorasweep(table, budget, seed, **engine)
    if strategy == "tpe":
        return run_plain(table, budget, seed, optuna.samplers.TPESampler(seed=seed), None)
    asha = {"grace": 1, "rf": 4} if strategy == "asha_random" else None
    return run_plain(table, budget, seed, optuna.samplers.RandomSampler(seed=seed), asha)


def summarize(table: Table, strategy: str, fraction: float, seeds: int, **engine) -> dict:
    budget = fraction * table.grid_cost_usd
    outs = [run(strategy, table, budget, seed, **engine) for seed in range(seeds)]
    regrets = [table.oracle - o.best_score for o in outs]
    q1, q3 = np.percentile(regrets, [25, 75])
    return {
        "budget_fraction": fraction,
        "strategy": strategy,
        "median_regret": round(statistics.median(regrets), 4),
        "iqr_regret": round(float(q3 - q1), 4),
        "spent_fraction": round(statistics.median(o.spent_usd for o in outs) / budget, 4),
        "overruns": sum(o.spent_usd > budget + 1e-12 for o in outs),
        "median_best_score": round(statistics.median(o.best_score for o in outs), 4),
        "median_trials": statistics.median(o.trials for o in outs),
    }


def main() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=str(ROOT / "bench/data/curves.json"))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench/results/search_efficiency.json"))
    ap.add_argument(
        "--first-trial",
        choices=("prior", "sampled"),
        default="prior",
        help="lorasweep's first trial: the priors' config (a spec's default) or sampled",
    )
    args = ap.parse_args()
    table = Table.load(Path(args.table))
    t0 = time.time()
    rows = {
        (s, f): summarize(table, s, f, args.seeds, first_trial=args.first_trial)
        for f in sorted(set(FRACTIONS) | set(TARGET_FRACTIONS))
        for s in STRATEGIES
    }
    keys = ("budget_fraction", "strategy", "median_regret", "iqr_regret", "spent_fraction")
    main_rows = [
        {**{k: r[k] for k in keys}, "overruns": r["overruns"]}
        for (s, f), r in rows.items()
        if f in FRACTIONS
    ]
    Path(args.out).write_text(json.dumps(main_rows, indent=1) + "\n")
    target = 0.99 * table.oracle
    to_target = {
        s: min(
            (f for (s2, f), r in rows.items() if s2 == s and r["median_best_score"] >= target),
            default=None,
        )
        for s in STRATEGIES
    }
    Path(args.out).with_name(Path(args.out).stem + "_to_target.json").write_text(
        json.dumps(
            {
                "oracle_score": table.oracle,
                "target_score": target,
                "grid_cost_usd": table.grid_cost_usd,
                "seeds": args.seeds,
                "budget_fraction_to_target": to_target,
                "first_trial": args.first_trial,
                # medians over the seeds at every budget tried: best score and share of the grid
                # actually spent (a baseline's last trial runs past its cap)
                "by_budget": [
                    {
                        "budget_fraction": f,
                        "strategy": s,
                        "median_best_score": r["median_best_score"],
                        "median_spent_of_grid": round(r["spent_fraction"] * f, 5),
                    }
                    for (s, f), r in rows.items()
                ],
            },
            indent=1,
        )
        + "\n"
    )
    print(
        f"oracle {table.oracle:.4f}, grid cost ${table.grid_cost_usd:.3f}, {args.seeds} seeds, "
        f"{time.time() - t0:.0f} s"
    )
    print("| budget | strategy | median regret | IQR | spent | overruns | median trials |")
    print("|---|---|---|---|---|---|---|")
    for (s, f), r in rows.items():
        if f in FRACTIONS:
            print(
                f"| {f:.0%} | {s} | {r['median_regret']:.4f} | {r['iqr_regret']:.4f} | "
                f"{r['spent_fraction']:.0%} | {r['overruns']}/{args.seeds} | "
                f"{r['median_trials']:g} |"
            )
    print(
        f"\nsmallest budget (share of the grid's cost) whose median best score is within 1% of "
        f"the oracle ({target:.4f}):"
    )
    for s, f in to_target.items():
        print(f"  {s:12s} {'not reached' if f is None else f'{f:.1%}'}")


if __name__ == "__main__":
    main()
