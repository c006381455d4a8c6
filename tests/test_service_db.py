"""The service database's migrations, on sqlite and on PostgreSQL (a fresh database each):
``lorasweep db upgrade`` creates the service's tables, a second run changes nothing, downgrade
and upgrade round-trip, the models agree with the migrations, and the ledger's tables in the
same database are never touched."""

from __future__ import annotations

import pytest
import sqlalchemy
from _ledger_db import BACKENDS
from service_server import run_cli, service_db

pytestmark = pytest.mark.service

SERVICE_TABLES = {"service_tenants", "service_tokens", "service_sweeps"}
VERSION_TABLE = "lorasweep_service_alembic_version"


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    with service_db(request.param, tmp_path) as url:
        yield url


def _tables(url: str) -> set[str]:
    engine = sqlalchemy.create_engine(url)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema(url: str) -> dict:
    """Every service table's columns (name, type, nullable) and indexes, for comparing."""
    engine = sqlalchemy.create_engine(url)
    try:
        insp = sqlalchemy.inspect(engine)
        return {
            t: (
                [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
                sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(t)),
            )
            for t in sorted(SERVICE_TABLES)
        }
    finally:
        engine.dispose()


def test_db_upgrade_creates_the_tables_and_a_second_run_is_a_no_op(db_url, tmp_path):
    assert not (_tables(db_url) & SERVICE_TABLES)
    first = run_cli(["db", "upgrade", "--db", db_url], cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "upgraded from empty to 0001" in first.stdout
    assert SERVICE_TABLES | {VERSION_TABLE} <= _tables(db_url)
    schema = _schema(db_url)

    second = run_cli(["db", "upgrade", "--db", db_url], cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already at revision 0001" in second.stdout
    assert _schema(db_url) == schema


def test_downgrade_and_upgrade_round_trip_and_leave_the_ledger_alone(db_url):
    from orchestrator.service import migrations
    from orchestrator.service.db import make_engine
    from orchestrator.store import Store

    store = Store(db_url)  # the ledger's tables, as a sweep's driver creates them
    store.open_sweep("s-1", "s", 1.0)
    store.close()
    engine = make_engine(db_url)
    try:
        migrations.upgrade(engine)
        assert migrations.current(engine) == migrations.head()
        schema = _schema(db_url)
        migrations.downgrade(engine, "base")
        assert migrations.current(engine) is None
        left = _tables(db_url)
        assert not (left & SERVICE_TABLES)
        assert {"lorasweep_sweeps", "lorasweep_accounts"} <= left  # the ledger's are still there
        migrations.upgrade(engine)
        assert _schema(db_url) == schema
    finally:
        engine.dispose()
    store = Store(db_url)
    try:
        assert store.sweep("s-1").cap_usd == 1.0
    finally:
        store.close()


def test_the_models_match_the_migrations(db_url):
    """Autogenerate finds nothing to do after the migrations: a model change without its
    revision fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from orchestrator.service import migrations
    from orchestrator.service.db import Base, make_engine

    engine = make_engine(db_url)
    try:
        migrations.upgrade(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "version_table": VERSION_TABLE,
                    "compare_type": True,
                    "include_name": lambda name, kind, _parent: (
                        kind != "table" or name.startswith("service_")
                    ),
                },
            )
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


def test_an_unreachable_database_is_one_line_with_the_password_hidden(tmp_path):
    url = "postgresql://lorasweep:s3cret-pw@127.0.0.1:9/nowhere?connect_timeout=2"
    done = run_cli(["db", "upgrade", "--db", url], cwd=tmp_path)
    assert done.returncode == 2
    out = done.stdout + done.stderr
    assert "s3cret-pw" not in out and "Traceback" not in out
    assert "***" in out and "127.0.0.1:9" in out
