"""The service's commands (``serve``, ``tokens``, ``db``), added to the ``lorasweep`` CLI."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from orchestrator.errors import LorasweepError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321
DEFAULT_MAX_RUNNING_SWEEPS = 1
console = Console(highlight=False, soft_wrap=True)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="LORASWEEP_SERVICE_DB",
        help="SQLAlchemy URL of the service database (also the ledger's); default "
        "lorasweep.db in the data folder (LORASWEEP_DATA, else ./lorasweep-data)",
        show_default=False,
    ),
]


def _friendly(fn):
    """User errors as one actionable line and exit 2, as the rest of the CLI does."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorasweepError as exc:
            Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


def _engine(db: str | None):
    from orchestrator.service.db import default_db_url, make_engine

    url = db or default_db_url()
    return url, make_engine(url)


def _migrated(db: str | None):
    """The database URL and an engine, the service's tables migrated to the newest revision."""
    from orchestrator.service import migrations

    url, engine = _engine(db)
    migrations.upgrade(engine)
    return url, engine


tokens_app = typer.Typer(no_args_is_help=True, help="Tenants' API tokens (stored hashed).")
db_app = typer.Typer(no_args_is_help=True, help="The service database's schema.")


@tokens_app.command("create")
@_friendly
def tokens_create(
    tenant: Annotated[str, typer.Option(help="Tenant name (created if new), e.g. team-a.")],
    quota_usd: Annotated[
        float | None,
        typer.Option(help="Monthly dollar quota of the tenant (sets it); default: unlimited."),
    ] = None,
    db: DbOpt = None,
) -> None:
    """Create a token for TENANT and print it once, alone on the last line (only its hash is
    stored: keep it safe)."""
    from orchestrator.service.auth import create_token

    _url, engine = _migrated(db)
    try:
        token_id, token = create_token(engine, tenant, quota_usd)
    finally:
        engine.dispose()
    quota = "unlimited" if quota_usd is None else f"${quota_usd:g}/month"
    console.print(f"token {token_id} for tenant {tenant} (quota {quota}); shown once:")
    print(token, flush=True)


@tokens_app.command("list")
@_friendly
def tokens_list(db: DbOpt = None) -> None:
    """Every token: id, tenant, its first characters, when made, whether revoked."""
    from datetime import datetime, timezone

    from rich.table import Table

    from orchestrator.service.auth import TOKEN_PREFIX, list_tokens

    _url, engine = _migrated(db)
    try:
        rows = list_tokens(engine)
    finally:
        engine.dispose()

    def when(t: float | None) -> str:
        return "-" if t is None else f"{datetime.fromtimestamp(t, timezone.utc):%Y-%m-%d %H:%M}Z"

    table = Table(title="tokens")
    for col in ("id", "tenant", "token", "quota_usd", "created", "revoked"):
        table.add_column(col)
    for r in rows:
        quota = "unlimited" if r.quota_usd is None else f"{r.quota_usd:g}"
        table.add_row(
            str(r.id),
            r.tenant,
            f"{TOKEN_PREFIX}{r.prefix}...",
            quota,
            when(r.created_unix),
            when(r.revoked_unix),
        )
    console.print(table if rows else "no tokens yet (lorasweep tokens create --tenant T)")


@tokens_app.command("revoke")
@_friendly
def tokens_revoke(
    token_id: Annotated[
        int, typer.Argument(metavar="ID", help="Token id (lorasweep tokens list).")
    ],
    db: DbOpt = None,
) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    from orchestrator.service.auth import revoke_token

    _url, engine = _migrated(db)
    try:
        found = revoke_token(engine, token_id)
    finally:
        engine.dispose()
    if not found:
        raise LorasweepError(f"ID: no token {token_id}; see lorasweep tokens list")
    console.print(f"token {token_id} revoked")


@db_app.command("upgrade")
@_friendly
def db_upgrade(db: DbOpt = None) -> None:
    """Apply the service's migrations (a second run is a no-op)."""
    from orchestrator.secrets import hide_password
    from orchestrator.service import migrations

    url, engine = _engine(db)
    try:
        before = migrations.current(engine)
        migrations.upgrade(engine)
        after = migrations.current(engine)
    finally:
        engine.dispose()
    if before == after:
        console.print(f"{hide_password(url)}: already at revision {after}")
    else:
        console.print(f"{hide_password(url)}: upgraded from {before or 'empty'} to {after}")


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    db: DbOpt = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Where sweeps run: a Ray dashboard (http://head:8265) for Ray Jobs; default: "
            "driver processes on this machine with local Ray."
        ),
    ] = None,
    max_running_sweeps: Annotated[
        int, typer.Option(min=0, help="Sweeps run at once; the rest wait queued (0: none start).")
    ] = DEFAULT_MAX_RUNNING_SWEEPS,
) -> None:
    """Run the sweep service: a REST API (FastAPI + uvicorn) with tenants, tokens and quotas;
    sweeps run in driver processes apart from the API and survive its restarts."""
    import uvicorn

    from orchestrator.secrets import hide_password
    from orchestrator.service.app import ServiceSettings, create_app
    from orchestrator.service.runner import Runner
    from orchestrator.store import Store

    try:
        url, engine = _migrated(db)
        Store(url).close()  # the ledger's tables, next to ours (quotas read its accounts)
    except LorasweepError as exc:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if ray_address:  # submitted specs are checked for a cluster's shared storage (preflight too)
        from orchestrator.storage_check import CLUSTER_ENV

        os.environ[CLUSTER_ENV] = ray_address
    from orchestrator.service.db import default_data_dir

    data_dir = default_data_dir()  # LORASWEEP_DATA or ./lorasweep-data
    runner = Runner(
        engine,
        service_db_url=url,
        data_dir=data_dir,
        ray_address=ray_address,
        max_running_sweeps=max_running_sweeps,
    )
    app = create_app(ServiceSettings(db_url=url, engine=engine, base_dir=Path.cwd()), runner)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    where = ray_address or "local drivers"
    console.print(
        f"lorasweep serve on http://{host}:{port} (db {hide_password(url)}, sweeps on {where}, "
        f"at most {max_running_sweeps} running)"
    )
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)


def register(app: typer.Typer) -> None:
    """Add the service's commands to ``app``."""
    app.command("serve")(serve)
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(db_app, name="db")
