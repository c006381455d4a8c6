"""Alembic migrations of the service's tables, configured in code (no ``alembic.ini``).

``upgrade(engine)`` brings the service's tables to the newest revision (``lorasweep serve`` runs
it at start, ``lorasweep db upgrade`` on demand); a second run is a no-op. Alembic's version
table is ``lorasweep_service_alembic_version``, and revisions touch only the ``service_*``
tables, so the ledger's tables in the same database (created by ``Store``) are left alone.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.service.db import ServiceDBError, _translate

__all__ = ["VERSION_TABLE", "upgrade", "downgrade", "current", "head"]

VERSION_TABLE = "lorasweep_service_alembic_version"
HERE = Path(__file__).resolve().parent


def config(engine: Engine | None = None) -> Config:
    """Alembic's config for our scripts; ``engine`` is handed to ``env.py`` in its attributes."""
    cfg = Config()
    cfg.set_main_option("path_separator", "os")  # a folder with spaces stays one location
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def _run(engine: Engine, what: str, fn) -> None:
    try:
        fn(config(engine))
    except SQLAlchemyError as exc:
        raise _translate(engine, exc, what) from exc


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` (default: the newest)."""
    _run(engine, "migration", lambda cfg: command.upgrade(cfg, revision))


def downgrade(engine: Engine, revision: str) -> None:
    """Undo migrations down to ``revision`` (``base``: none of the service's tables)."""
    _run(engine, "downgrade", lambda cfg: command.downgrade(cfg, revision))


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return ctx.get_current_revision()
    except SQLAlchemyError as exc:
        raise _translate(engine, exc, "read of the migration version") from exc


def head() -> str:
    """The newest revision of the scripts."""
    rev = ScriptDirectory.from_config(config()).get_current_head()
    if rev is None:  # no revision scripts: the package was installed without them
        raise ServiceDBError("service database: no migration scripts found in the package")
    return rev
