"""The ``lorasweep`` command line: a thin layer over the orchestrator library.

Heavy imports (torch, transformers, ray, mlflow) happen inside commands so ``--help`` is fast.
"""

from __future__ import annotations

import functools
import os
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from orchestrator.errors import LorasweepError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Budget-capped LoRA sweeps on Ray, driven by Optuna, tracked in MLflow. "
    "LORASWEEP_VERBOSE=1 shows the libraries' own logs, warnings and progress bars.",
)
# piped output (CI, `| tee`) gets a width that fits the leaderboard instead of rich's 80, or
# COLUMNS when set
console = Console(highlight=False, width=None if os.isatty(1) or os.environ.get("COLUMNS") else 132)
# where results live (orchestrator/results_home.py): one data folder for every command, single
# stores overridable; read commands never create a store
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="LORASWEEP_DATA",
        help="Folder of the embedded stores (mlflow.db, lorasweep.db, ...); default "
        "./lorasweep-data. For run: used when the spec sets no storage.data_dir.",
    ),
]
ServiceDbOpt = Annotated[
    str | None,
    typer.Option(
        "--service-db",
        envvar="LORASWEEP_SERVICE_DB",
        help="SQLAlchemy URL of the budget ledger; default: lorasweep.db in --data-dir.",
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="LORASWEEP_TRACKING_URI",
        help="MLflow tracking URI holding the sweeps (sqlite file or http server); default: "
        "mlflow.db in --data-dir.",
    ),
]

# a sweep service (`lorasweep serve`) to talk to instead of running here; the token comes from
# LORASWEEP_TOKEN only (a flag would show it in `ps` and in shell history)
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="LORASWEEP_SERVER",
        help="URL of a sweep service (lorasweep serve) to use instead of this machine; "
        "token in LORASWEEP_TOKEN.",
    ),
]

# the service names each tenant's experiments TENANT/NAME; the CLI's default is the spec's name
ExperimentOpt = Annotated[
    str | None,
    typer.Option("--experiment", hidden=True, help="MLflow experiment name (set by the service)."),
]


@app.callback()
def _start() -> None:
    """Budget-capped LoRA sweeps on Ray, driven by Optuna, tracked in MLflow. Set
    LORASWEEP_VERBOSE=1 to see the libraries' own logs, warnings and progress bars."""
    from orchestrator import quiet

    quiet.apply()  # before any library is imported: the commands import them lazily


def _friendly(fn):
    """Print user errors as one actionable line and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorasweepError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


def _runs_link(result) -> str:
    """The sweep's runs in the MLflow UI, on its training side (``tracking.runs_url``)."""
    from orchestrator import leaderboard
    from orchestrator.tracking import runs_url

    try:
        parent = leaderboard.find_sweep(result.tracking_uri, result.sweep_id)
    except Exception:  # noqa: BLE001 - the link is a convenience; the sweep's result stands
        return "http://127.0.0.1:5000"
    return runs_url("http://127.0.0.1:5000", parent.info.experiment_id)


def _ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port 5000"


@app.command()
@_friendly
def run(
    spec: Annotated[
        Path | None,
        typer.Argument(help="Sweep YAML; omit to run the embedded demo (examples/demo.yaml)."),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (e.g. ray://head:10001 or auto); default: local Ray."
        ),
    ] = None,
    new: Annotated[
        bool,
        typer.Option(
            "--new", help="Start a separate sweep (its own cap) even if the latest is unfinished."
        ),
    ] = False,
    sweep_id: Annotated[
        str | None, typer.Option("--sweep-id", hidden=True, help="Set by the service.")
    ] = None,
    experiment: ExperimentOpt = None,
    server: ServerOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run a budget-capped sweep and print its leaderboard (with --server: submit it to the
    sweep service and follow it; Ctrl-C stops watching, not the sweep)."""
    from orchestrator.spec import EXAMPLE_SPEC, load_spec

    if server:
        _submit_and_follow(server, spec)
        return

    sweep_spec = _in_data_dir(load_spec(spec), data_dir)
    console.print(f"[bold]spec[/] {spec or f'{EXAMPLE_SPEC.name} (the embedded demo)'}")
    if not new:
        _refuse_unfinished(sweep_spec)
    from orchestrator.sweep import run_sweep

    _mark_cluster(address)
    _show(
        run_sweep(
            sweep_spec,
            console,
            address=address,
            spec_path=spec or EXAMPLE_SPEC,
            sweep_id=sweep_id,
            experiment=experiment,
        )
    )


def _in_data_dir(sweep_spec, data_dir: Path | None):
    """The spec with ``--data-dir`` / ``LORASWEEP_DATA`` as its data folder, unless the spec sets
    ``storage.data_dir`` itself (the spec's own choice wins)."""
    if data_dir is None or "data_dir" in sweep_spec.storage.model_fields_set:
        return sweep_spec
    storage = sweep_spec.storage.model_copy(update={"data_dir": data_dir})
    return sweep_spec.model_copy(update={"storage": storage})


def _mark_cluster(address: str | None) -> None:
    """``--address``: the sweep runs on a Ray cluster, so its storage must be every node's
    (``storage.ray_storage``; checked by ``make_plan``, ``orchestrator/storage_check.py``)."""
    if address:
        from orchestrator.storage_check import CLUSTER_ENV

        os.environ[CLUSTER_ENV] = address


@app.command()
@_friendly
def resume(
    sweep: Annotated[str, typer.Argument(help="Id of the sweep to continue.")],
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    spec: Annotated[
        Path | None, typer.Option(help="Spec file; default: the one the sweep ran with.")
    ] = None,
    service_db: ServiceDbOpt = None,
    experiment: ExperimentOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Continue an interrupted sweep where it stopped: same budget, ledger, Optuna study, Tune
    experiment and MLflow runs."""
    from orchestrator.results_home import require_ledger
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep

    row = _sweep_row(require_ledger(service_db, data_dir), sweep)
    path = spec or (Path(row.spec_path) if row.spec_path else None)
    if path is None:
        raise LorasweepError(f"--spec: sweep {sweep} recorded no spec file; pass the spec it ran")
    sweep_spec = _in_data_dir(load_spec(path), data_dir)
    if sweep_spec.name != row.name:
        raise LorasweepError(
            f"--spec: {path} is spec {sweep_spec.name!r}, the sweep is {row.name!r}"
        )
    _mark_cluster(address)
    _show(
        run_sweep(
            sweep_spec,
            console,
            address=address,
            resume=sweep,
            spec_path=path,
            experiment=experiment,
        )
    )


@app.command()
@_friendly
def abandon(
    sweep: Annotated[str, typer.Argument(help="Id of the unfinished sweep to give up.")],
    service_db: ServiceDbOpt = None,
    tracking_uri: TrackingOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give up an interrupted sweep: settle every open account at what it spent up to the crash,
    close its MLflow runs as KILLED, mark it cancelled."""
    from orchestrator.abandon import abandon as do_abandon
    from orchestrator.results_home import require_ledger, require_tracking_store

    ledger = require_ledger(service_db, data_dir)
    snap = do_abandon(ledger, require_tracking_store(tracking_uri, data_dir), sweep)
    console.print(
        f"[bold]abandoned[/] {sweep}: spent ${snap['spent_usd']:.5f} of ${snap['cap_usd']:g}, "
        "every account settled, its MLflow runs closed"
    )


def _sweep_row(service_db: str, sweep: str):
    from orchestrator.store import Store

    row = Store(service_db).sweep(sweep)
    if row is None:
        raise LorasweepError(f"SWEEP: no sweep {sweep!r} in --service-db {service_db}")
    return row


def _refuse_unfinished(sweep_spec) -> None:
    from orchestrator.costmodel import sqlite_file_missing
    from orchestrator.lifecycle import refuse_unfinished
    from orchestrator.store import Store
    from orchestrator.sweep import storage_urls

    service_db = storage_urls(sweep_spec)[3]
    if sqlite_file_missing(service_db):
        return
    try:
        store = Store(service_db)
    except LorasweepError:
        return  # the preflight's storage check names the bad URL and the fix
    refuse_unfinished(store, sweep_spec.name)


def _show(result) -> None:
    """The end of a run or resume: leaderboard, spend, how it ended and what to do next."""
    from orchestrator import leaderboard

    console.print(leaderboard.render(result.rows, title=f"leaderboard — {result.sweep_id}"))
    pct = 100 * result.spent_usd / result.budget_usd
    console.print(
        f"[bold]spent[/] ${result.spent_usd:.5f} of ${result.budget_usd:g} "
        f"({pct:.1f}%), {len(result.rows)} trials, {result.wall_s:.0f} s wall"
    )
    console.print(f"[bold]ended[/] {result.end_reason}")
    if result.best is not None:
        base = "-" if result.base_score is None else f"{result.base_score:.3f}"
        console.print(
            f"[bold]score[/] base model {base} -> best {result.best.score:.3f} "
            f"({result.best.trial}, ${result.best.cost_usd:.5f})"
        )
    link = _runs_link(result)
    console.print(f"[bold]browse[/] {_ui_command(result.tracking_uri)}   (then open {link})")
    if result.interrupted:
        console.print(
            f"[bold]interrupted[/] sweep {result.sweep_id}: every account is settled "
            f"(${result.spent_usd:.5f} spent); continue it with lorasweep resume {result.sweep_id}"
        )
        raise typer.Exit(130)
    console.print(f"[bold]next[/]  lorasweep promote {result.sweep_id}")


@app.command()
@_friendly
def validate(
    spec: Annotated[Path, typer.Argument(help="Sweep YAML to check.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Check a spec, its data, model and prices, and predict costs; spends nothing."""
    from orchestrator import validate_report as report
    from orchestrator.preflight import make_plan
    from orchestrator.spec import config_label, load_spec

    sweep_spec = _in_data_dir(load_spec(spec), data_dir)
    plan = make_plan(sweep_spec)
    steps = len(sweep_spec.eval_steps)
    console.print(
        f"[green]ok[/] {spec}: model {plan.model_ref}, trial resources "
        f"${plan.price_usd_per_hour:.4f}/h"
    )
    for line in [report.data_line(sweep_spec, plan), *report.shape_lines(sweep_spec, plan)]:
        console.print(line, markup=False)
    for line in report.money_lines(sweep_spec, plan):
        console.print(line)
    console.print(_calibration_line(sweep_spec, plan.cost_model))
    extremes = plan.extremes(sweep_spec.search_space)
    for label, hp in zip(("cheapest", "dearest"), extremes, strict=True):
        what = config_label(hp)
        console.print(
            f"  {label} trial ({what}): predicted ${plan.admission_usd({}, hp):.5f} to the first "
            f"rung, ${plan.trial_usd({}, hp, sweep_spec.trial.max_steps, steps):.5f} in full"
        )
        console.print(f"    {_timings_line(plan.cost_model, hp)}")


def _calibration_line(spec, cost_model) -> str:
    """Where the predictions' timings come from: this spec's stored calibration, or priors."""
    from orchestrator.costmodel import spec_calibration_key

    model, accelerator = spec_calibration_key(spec)
    if not cost_model.stored:
        return f"  timings: priors (no stored calibration for {model} on {accelerator})"
    names = ", ".join(sorted(cost_model.stored))
    return f"  timings: calibrated for {model} on {accelerator} by earlier sweeps ({names})"


def _timings_line(cost_model, hp: dict) -> str:
    """Each term of a trial's prediction, marked measured (with the name it was stored under)
    or prior."""
    parts = []
    for term, t in cost_model.explain(hp).items():
        if term == "compile_s" and not t.seconds:
            continue
        origin = f"measured {t.source}" if t.measured else "prior"
        parts.append(f"{term[:-2]} {t.seconds:.3g} s ({origin})")
    return "; ".join(parts)


@app.command()
@_friendly
def status(
    sweep: Annotated[
        str | None, typer.Argument(help="Sweep id or spec name; omit to list all.")
    ] = None,
    tracking_uri: TrackingOpt = None,
    service_db: ServiceDbOpt = None,
    server: ServerOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="With --server: follow the sweep's events to its end.")
    ] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Sweeps and their spend, or one sweep's spent / reserved / remaining and its trials'
    predicted vs actual cost."""

    from orchestrator import leaderboard

    if server:
        _server_status(server, sweep, follow)
        return
    if follow:
        raise LorasweepError("--follow: needs --server (a local sweep prints to its own terminal)")
    from orchestrator import results_home

    tracking_uri = results_home.require_tracking_store(tracking_uri, data_dir)
    service_db = results_home.service_db(service_db, data_dir)
    if sweep is None:
        console.print(_sweeps_table(tracking_uri, service_db))
        return
    parent = leaderboard.find_sweep(tracking_uri, sweep)
    rows = leaderboard.trial_rows(tracking_uri, parent)
    m, t = parent.data.metrics, parent.data.tags
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    accounts = _ledger_status(service_db, parent.info.run_name)
    if accounts is None:  # no ledger here (another machine's sweep): MLflow's numbers
        spent = sum(r.cost_usd for r in rows) + m.get("baseline_cost_usd", 0.0)
        money = (
            f"spent ${max(spent, m.get('budget_spent_usd', 0.0)):.5f} of "
            f"${float(parent.data.params.get('budget_usd', 'nan')):g}"
        )
    else:
        totals, accounts = accounts
        money = (
            f"spent ${totals.spent_usd:.5f}, reserved ${totals.reserved_usd:.5f}, "
            f"remaining ${totals.remaining_usd:.5f} of ${totals.cap_usd:g}"
        )
    state = t.get("lorasweep.status", "?")
    store = _ledger_store(service_db) if accounts is not None else None
    state = (_live_state(store, parent.info.run_name) if store else None) or state
    console.print(
        f"[bold]{parent.info.run_name}[/] {state}: {money}; "
        "trials " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    )
    if state == "interrupted":
        console.print(
            f"its driver is gone: continue it with lorasweep resume {parent.info.run_name}, or "
            f"give it up with lorasweep abandon {parent.info.run_name}"
        )
    if "lorasweep.end_reason" in t:
        console.print(f"ended: {t['lorasweep.end_reason']}")
    best = leaderboard.best_row(rows)
    if best:
        console.print(f"best so far: {best.trial} score {best.score:.3f} (${best.cost_usd:.5f})")
    if accounts:
        console.print(_predicted_vs_actual(rows, accounts))


def _sweeps_table(tracking_uri: str, service_db: str):
    """All sweeps with the ledger's spend (the one figure every view shows); MLflow's last
    logged spend, marked, for sweeps the ledger here does not hold."""
    from rich.table import Table

    from orchestrator import leaderboard

    store = _ledger_store(service_db)
    in_ledger = set(store.sweep_ids()) if store is not None else set()
    table = Table(title="sweeps")
    for col in ("sweep", "status", "trials", "spent_usd", "budget_usd", "best_score"):
        table.add_column(col)
    from_mlflow = False
    for run in leaderboard.sweep_runs(tracking_uri):
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        best = m.get("best_score")
        state = t.get("lorasweep.status", "?")
        if run.info.run_name in in_ledger:
            spent = f"{store.totals(run.info.run_name).spent_usd:.5f}"
            state = _live_state(store, run.info.run_name) or state
        else:
            spent = f"{m.get('spent_usd', m.get('budget_spent_usd', 0.0)):.5f}*"
            from_mlflow = True
        table.add_row(
            run.info.run_name,
            state,
            str(int(m.get("trials", 0))) if "trials" in m else "-",
            spent,
            p.get("budget_usd", "-"),
            "-" if best is None else f"{best:.3f}",
        )
    if from_mlflow:
        table.caption = "* from MLflow: the ledger at --service-db does not hold this sweep"
    return table


def _live_state(store, sweep_id: str) -> str | None:
    """The sweep's state by its SQL row (a running sweep whose driver stopped beating reads
    ``interrupted``), or None when the ledger does not hold it."""
    from orchestrator.lifecycle import effective_state

    row = store.sweep(sweep_id)
    return None if row is None else effective_state(row)


def _ledger_store(service_db: str):
    """The SQL ledger, or None where its sqlite file does not exist (none is created)."""
    from orchestrator.costmodel import sqlite_file_missing
    from orchestrator.store import Store

    if sqlite_file_missing(service_db):
        return None
    return Store(service_db)


def _ledger_status(service_db: str, sweep_id: str):
    """(totals, accounts by key) from the SQL ledger, or None when it has no such sweep."""
    store = _ledger_store(service_db)
    if store is None or sweep_id not in store.sweep_ids():
        return None
    return store.totals(sweep_id), {a.key: a for a in store.accounts(sweep_id)}


def _predicted_vs_actual(rows, accounts: dict):
    from rich.table import Table

    table = Table(title="predicted vs actual cost per trial (USD)")
    for col in ("trial", "status", "predicted", "actual", "actual/predicted"):
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for r in sorted(rows, key=lambda r: r.trial):
        acct = accounts.get(r.trial_id)
        predicted = acct.predicted_usd if acct else None
        actual = acct.spent_usd if acct else r.cost_usd
        ratio = f"{actual / predicted:.2f}" if predicted else "-"
        table.add_row(
            r.trial,
            r.status,
            "-" if predicted is None else f"{predicted:.5f}",
            f"{actual:.5f}",
            ratio,
        )
    return table


@app.command(name="leaderboard")
@_friendly
def leaderboard_cmd(
    sweep: Annotated[str | None, typer.Argument(help="Sweep id or spec name (latest).")] = None,
    tracking_uri: TrackingOpt = None,
    server: ServerOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """The trials of a sweep, best first."""
    from orchestrator import leaderboard

    if server:
        client = _client(server)
        info = client.sweep(sweep or _latest_sweep_id(client, server))
        console.print(_trials_table(info))
        return
    from orchestrator.results_home import require_tracking_store

    tracking_uri = require_tracking_store(tracking_uri, data_dir)
    parent = leaderboard.find_sweep(tracking_uri, sweep)
    rows = leaderboard.trial_rows(tracking_uri, parent)
    console.print(leaderboard.render(rows, title=f"leaderboard — {parent.info.run_name}"))


@app.command()
@_friendly
def promote(
    sweep: Annotated[
        str | None, typer.Argument(help="Sweep id, or spec name for its latest sweep (required).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Registered model name; default: spec name.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Move `champion` even if the new version is not better."),
    ] = False,
    tracking_uri: TrackingOpt = None,
    server: ServerOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Register the sweep's best adapter (its best checkpoint by the objective); `champion` moves
    to it only when it beats the current champion on the same split and scorer (or --force)."""
    if server:
        if name:
            raise LorasweepError("--name: the server names the model TENANT.SPEC; drop --name")
        if not sweep:
            raise LorasweepError("SWEEP: say which sweep to promote (lorasweep status --server)")
        client = _client(server)
        sweep_id = sweep
        console.print(f"[bold]promoting[/] the best trial of {sweep_id} on {server} ...")
        p = client.promote(sweep_id)
        test = "" if p.get("test_score") is None else f", test score {p['test_score']:.3f}"
        console.print(
            f"[green]registered[/] {p['model']} version {p['version']} as @{p['alias']}{test}"
        )
        return
    from orchestrator.results_home import require_tracking_store

    _promote_here(require_tracking_store(tracking_uri, data_dir), sweep, name, force)


def _promote_here(tracking_uri: str, sweep: str | None, name: str | None, force: bool) -> None:
    """``promote`` on this machine: what was registered, where ``champion`` points and why, the
    base model's pin, the prompt shape, and how to try and load it."""
    from rich.markup import escape

    from orchestrator.registry import ALIAS
    from orchestrator.registry import promote as do_promote

    console.print("[bold]promoting[/] the best trial (scoring it on the test split) ...")
    p = do_promote(tracking_uri, sweep, name, force=force)
    test = "" if p.test_score is None else f", test score {p.test_score:.3f}"
    step = "" if p.best_step is None else f" at step {p.best_step}"
    loss = "" if p.eval_loss is None else f" eval_loss {p.eval_loss:.4f}"
    console.print(
        f"[green]registered[/] {p.name} version {p.version} as @{p.alias}: "
        f"validation score {p.score:.3f}{loss} ({escape(p.trial)}{step}, by {p.objective}){test}, "
        f"trial cost ${p.cost_usd:.5f}"
    )
    if p.alias == ALIAS:
        replaced = f"; replaces version {p.replaced}" if p.replaced else ""
        console.print(f"[bold]champion[/] version {p.version}: {escape(p.reason)}{replaced}")
    else:
        console.print(
            f"[bold]champion[/] stays at version {p.champion_version}: {escape(p.reason)} "
            "(--force moves it)"
        )
    console.print(f"[bold]base model[/] {escape(p.base)}")
    for line in p.shape.describe() if p.shape else []:
        console.print(f"[bold]prompt[/] {escape(line)}")
    example = shlex.quote(" ".join(p.shape.input_example.split())) if p.shape else '"..."'
    console.print(
        f"[bold]try it[/] lorasweep generate --model models:/{p.name}@{p.alias} {escape(example)}"
    )
    console.print(
        f"[bold]load it[/] MLFLOW_TRACKING_URI={shlex.quote(_absolute_uri(tracking_uri))} then "
        f"mlflow.pyfunc.load_model('models:/{p.name}@{p.alias}'); LORASWEEP_BASE_MODEL=DIR "
        "points at a copy of the base model"
    )


def _absolute_uri(tracking_uri: str) -> str:
    """A sqlite URI with a relative path made absolute (works from any directory)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not tracking_uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(tracking_uri[len(prefix) :]).resolve())
    return tracking_uri


@app.command()
@_friendly
def cancel(
    sweep: Annotated[str, typer.Argument(help="Id of the sweep to cancel.")],
    server: ServerOpt = None,
) -> None:
    """Cancel a sweep of the sweep service: a queued one at once; a running one's trials close
    inside their grants and every account settles (what was spent stays on record)."""
    if not server:
        raise LorasweepError(
            "--server: cancel is for sweeps of a sweep service (or set LORASWEEP_SERVER); stop a "
            "local sweep with Ctrl-C in its terminal, give up a dead one with lorasweep abandon"
        )
    out = _client(server).cancel(sweep)
    state = out.get("state", "cancelling")
    console.print(
        f"[bold]cancel[/] {sweep}: {state}; its running trials close inside their grants. "
        f"Watch it end: lorasweep status {sweep} --server {server} --follow"
    )


# --- the sweep service (--server) ----------------------------------------------------------------
def _client(server: str):
    from orchestrator.service.client import ServiceClient

    return ServiceClient(server)


def _latest_sweep_id(client, server: str) -> str:
    sweeps = client.sweeps()
    if not sweeps:
        raise LorasweepError(f"SWEEP: no sweep of yours on {server}; submit one with run --server")
    return max(sweeps, key=lambda s: s.get("created_unix", 0) or 0)["id"]


def _submit_and_follow(server: str, spec: Path | None) -> None:
    """``run --server``: submit the spec's YAML (its data paths are the server's), then print
    the sweep's progress lines until it ends; the exit code says how it ended."""
    if spec is None:
        raise LorasweepError("SPEC: pass the spec file to submit to --server")
    if not spec.is_file():
        raise LorasweepError(f"SPEC: file {spec} not found; pass the path of a sweep YAML")
    client = _client(server)
    out = client.submit_yaml(spec.read_text(encoding="utf-8"))
    sweep_id = out["id"]
    first = out.get("predicted_first_rung_usd")
    console.print(
        f"[bold]submitted[/] {sweep_id} to {server}: budget ${out['budget_usd']:g}"
        + ("" if first is None else f", first rung predicted ${first:.5f}")
        + f"; {out.get('state', 'queued')}"
    )
    _follow(client, server, sweep_id)


def _follow(client, server: str, sweep_id: str) -> None:
    """Print the sweep's events to its end, then its outcome; Ctrl-C stops watching only."""
    import signal
    import threading

    from orchestrator.service.client import FINAL_STATES

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C / SIGINT stops watching also where the shell started us ignoring it (a
        # background job: Python then installs no handler, and the watch went on to the end)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for _, event in client.follow(sweep_id):
            console.print(event.get("line", ""), markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        console.print(
            f"\n[yellow]stopped watching[/] {sweep_id}; it goes on on the server. Watch again: "
            f"lorasweep status {sweep_id} --server {server} --follow   (cancel it: lorasweep "
            f"cancel {sweep_id} --server {server})"
        )
        raise typer.Exit(130) from None
    info = client.sweep(sweep_id)
    _print_sweep(info)
    state = info.get("state")
    if state not in FINAL_STATES:
        return
    if state == "completed":
        console.print(f"[bold]next[/]  lorasweep promote {sweep_id} --server {server}")
        return
    raise typer.Exit(130 if state in ("cancelled", "interrupted") else 1)


def _server_status(server: str, sweep: str | None, follow: bool) -> None:
    from rich.table import Table

    client = _client(server)
    if sweep is None:
        if follow:
            raise LorasweepError("SWEEP: --follow needs the sweep's id")
        table = Table(title=f"sweeps on {server}")
        for col in ("sweep", "state", "spent_usd", "budget_usd", "end_reason"):
            table.add_column(col)
        for s in client.sweeps():
            spent = s.get("spent_usd")
            table.add_row(
                s["id"],
                str(s.get("state", "?")),
                "-" if spent is None else f"{spent:.5f}",
                f"{s.get('budget_usd', 0):g}",
                str(s.get("end_reason") or ""),
            )
        console.print(table)
        return
    if follow:
        _follow(client, server, sweep)
        return
    _print_sweep(client.sweep(sweep))


def _print_sweep(info: dict) -> None:
    """One sweep as the service reports it: state, money, best trial, trials, MLflow run."""
    money = (
        f"spent ${info.get('spent_usd', 0):.5f}, reserved ${info.get('reserved_usd', 0):.5f}, "
        f"remaining ${info.get('remaining_usd', 0):.5f} of ${info.get('budget_usd', 0):g}"
    )
    console.print(f"[bold]{info['id']}[/] {info.get('state', '?')}: {money}")
    if info.get("end_reason"):
        console.print(f"ended: {info['end_reason']}", markup=False)
    best = info.get("best")
    if best:
        console.print(
            f"best: {best.get('trial')} score {best.get('score', 0):.3f} "
            f"(${best.get('cost_usd', 0):.5f})"
        )
    if info.get("trials"):
        console.print(_trials_table(info))
    mlflow = info.get("mlflow") or {}
    if mlflow.get("parent_run_id"):
        console.print(
            f"mlflow: {mlflow.get('tracking_uri')} experiment {mlflow.get('experiment_id')} "
            f"run {mlflow['parent_run_id']}",
            markup=False,
        )


def _trials_table(info: dict):
    """The sweep's leaderboard rows (dicts from the server), best first as the server sends
    them, in the columns of the local leaderboard."""
    from rich.table import Table

    table = Table(title=f"leaderboard — {info['id']}")
    rows = info.get("trials") or []
    from orchestrator.leaderboard import COLUMNS as wanted

    cols = [c for c in wanted if any(c in r for r in rows)] or list(rows[0]) if rows else []
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    return table


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


@app.command()
@_friendly
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message to complete.")],
    model: Annotated[str, typer.Option(help="Model URI, e.g. models:/demo@champion.")],
    system: Annotated[
        str | None, typer.Option(help="System prompt; default: the training one.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Default: the model's (at least 128).")
    ] = None,
    tracking_uri: TrackingOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Load a registered model (base + adapter) as plain MLflow does and print a completion."""
    from orchestrator.registry import generate as do_generate
    from orchestrator.results_home import require_tracking_store
    from orchestrator.results_home import tracking_uri as default_uri

    registered = model.startswith(("models:/", "runs:/"))  # those URIs read the tracking store
    if registered:
        tracking_uri = require_tracking_store(tracking_uri, data_dir)
    else:
        tracking_uri = default_uri(tracking_uri, data_dir)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(do_generate(tracking_uri, model, prompt, system=system, max_new_tokens=max_new_tokens))


if __name__ == "__main__":
    app()


def _register_service() -> None:
    from orchestrator.service.cli import register

    register(app)


_register_service()
