"""Alembic's environment for the service's tables: the engine comes from ``config.attributes``
(set by ``orchestrator.service.migrations.config``); only ``service_*`` tables are compared, so
autogenerate never proposes dropping the ledger's, MLflow's or Optuna's tables."""

from __future__ import annotations

from alembic import context

from orchestrator.service.db import Base, make_engine
from orchestrator.service.migrations import VERSION_TABLE

config = context.config


def _ours(name, type_, *_args) -> bool:
    return type_ != "table" or bool(name and name.startswith("service_"))


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=_ours,
        render_as_batch=connection.dialect.name == "sqlite",  # sqlite's ALTER TABLE is limited
        compare_type=True,
    )


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:  # the alembic command line: `-x db=URL`
        engine = make_engine(context.get_x_argument(as_dictionary=True)["db"])
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported: pass a database URL")
run_migrations_online()
