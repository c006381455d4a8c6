"""Sweep results read back from MLflow: find a sweep, its trials, the leaderboard and plots."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.errors import LorasweepError
from orchestrator.tracking import KIND_TAG, PARENT_TAG, STATUS_TAG, SWEEP_TAG

COLUMNS = (
    "trial",
    "method",
    "rank",
    "alpha",
    "targets",
    "lr",
    "score",
    "eval_loss",
    "best_step",
    "cost_usd",
    "billed_s",
    "status",
)


@dataclass
class Row:
    trial: str
    method: str
    rank: int | None
    alpha: float | None
    targets: str
    lr: float | None
    score: float | None
    eval_loss: float | None
    cost_usd: float
    billed_s: float
    status: str
    run_id: str
    trial_id: str = ""
    # the eval whose adapter the trial kept (its best by the objective): score and eval_loss
    # above are that eval's; None while it runs (then they are its latest)
    best_step: int | None = None


def objective(parent) -> tuple[str, str]:
    """(metric, mode) the sweep ranks by, from its parent run (``score``/``max`` for sweeps that
    predate the ``objective_mode`` param)."""
    p = parent.data.params
    metric = p.get("objective", "score")
    return metric, p.get("objective_mode", "min" if metric == "eval_loss" else "max")


def rank_key(metric: str, mode: str):
    """Sort key: best by the objective first (unscored last), then cheaper."""

    def key(r: Row):
        value = getattr(r, metric)
        if value is None:
            return (True, 0.0, r.cost_usd)
        return (False, -value if mode == "max" else value, r.cost_usd)

    return key


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def sweep_runs(tracking_uri: str, max_results: int = 50) -> list:
    """Parent runs of all sweeps, newest first."""
    client = _client(tracking_uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    return client.search_runs(
        exp_ids,
        filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def find_sweep(tracking_uri: str, sweep: str | None):
    """The parent run of ``sweep`` (a sweep id, or a spec name meaning its latest sweep);
    ``None`` means the latest sweep of all."""
    runs = sweep_runs(tracking_uri, max_results=1000)
    for run in runs:
        sweep_id = run.data.tags.get(SWEEP_TAG, "")
        if (
            sweep is None
            or sweep == sweep_id
            or sweep == sweep_id.rsplit("-", 2)[0]
            or sweep == run.info.run_id
        ):
            return run
    known = sorted({r.data.tags.get(SWEEP_TAG, "") for r in runs})[:10]
    raise LorasweepError(
        f"SWEEP: no sweep named {sweep!r} in {tracking_uri}; known: "
        f"{', '.join(known) or 'none yet (run `lorasweep run`)'}"
    )


def trial_rows(tracking_uri: str, parent) -> list[Row]:
    """Trials of one sweep, best first by the sweep's objective (then cheaper first)."""
    client = _client(tracking_uri)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        max_results=5000,
    )
    rows = []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        rows.append(
            Row(
                trial=run.info.run_name,
                method=p.get("method", "lora"),
                rank=int(p["rank"]) if "rank" in p else None,
                alpha=float(p["alpha"]) if "alpha" in p else None,
                targets=p.get("target_modules", ""),
                lr=float(p["learning_rate"]) if "learning_rate" in p else None,
                score=m.get("best_score", m.get("score")),
                eval_loss=m.get("best_eval_loss", m.get("eval_loss")),
                cost_usd=m.get("cost_usd", 0.0),
                billed_s=m.get("billed_s", 0.0),
                status=t.get(STATUS_TAG, "running"),
                run_id=run.info.run_id,
                trial_id=t.get("lorasweep.trial_id", ""),
                best_step=int(m["best_step"]) if "best_step" in m else None,
            )
        )
    return sorted(rows, key=rank_key(*objective(parent)))


def best_row(rows: list[Row]) -> Row | None:
    """The first scored trial that did not fail (``rows`` come ranked by the objective)."""
    scored = [r for r in rows if r.score is not None and r.status != "failed"]
    return scored[0] if scored else None


def write_csv(rows: list[Row], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "run_id", "trial_id"])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    return path


def plot_score_vs_cost(rows: list[Row], path: Path, base_score: float | None = None) -> Path:
    """Each trial's final score against its cost: marker by method, colour by status, and the
    Pareto front (no other trial is both better and cheaper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.report import pareto_front

    markers = {"lora": "o", "qlora": "s", "full": "^"}
    colors = {
        "completed": "tab:green",
        "pruned": "tab:orange",
        "budget_stopped": "tab:red",
        "failed": "black",
        "running": "tab:blue",
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in sorted({r.method for r in rows}):
        for status in sorted({r.status for r in rows}):
            pts = [
                r for r in rows if r.method == method and r.status == status and r.score is not None
            ]
            if pts:
                ax.scatter(
                    [r.cost_usd for r in pts],
                    [r.score for r in pts],
                    alpha=0.8,
                    marker=markers.get(method, "o"),
                    color=colors.get(status, "grey"),
                    label=f"{method} {status}",
                )
    front = pareto_front(rows)
    if len(front) > 1:
        ax.step(
            [r.cost_usd for r in front],
            [r.score for r in front],
            where="post",
            color="grey",
            linewidth=1,
            label="Pareto front",
        )
    if base_score is not None:
        ax.axhline(base_score, color="grey", linestyle="--", label="base model")
    ax.set_xlabel("trial cost (USD)")
    ax.set_ylabel("score")
    ax.set_title("score vs cost per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render(rows: list[Row], title: str = "leaderboard"):
    """A rich Table of the leaderboard."""
    from rich.table import Table

    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(
            col, justify="right" if col not in ("trial", "method", "targets", "status") else "left"
        )

    def fmt(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        table.add_row(
            r.trial,
            r.method,
            fmt(r.rank, "d"),
            fmt(r.alpha, "g"),
            r.targets,
            fmt(r.lr, ".2e"),
            fmt(r.score, ".3f"),
            fmt(r.eval_loss, ".4f"),
            fmt(r.best_step, "d"),
            fmt(r.cost_usd, ".5f"),
            fmt(r.billed_s, ".1f"),
            r.status,
        )
    return table
