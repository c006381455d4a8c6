"""The service's own tables (tenants, tokens, sweeps) and the one session helper over them.

They live in the service database (``--db URL``, env ``LORASWEEP_SERVICE_DB``), the same
database as the ledger's store (``orchestrator/store.py``), so a sweep's spend is read from the
ledger's tables next to them. Alembic owns these tables (``orchestrator/service/migrations``,
version table ``lorasweep_service_alembic_version``) and never touches the ledger's, which
``Store`` creates itself.

sqlite runs in WAL mode with a busy timeout, as the ledger's store does; its transactions are
begun by us (``BEGIN``, or ``BEGIN IMMEDIATE`` with ``session_scope(..., immediate=True)``) so
a quota admission takes the single writer's lock before it reads, and two admissions of one
tenant cannot both pass on the same numbers. On PostgreSQL the same admission locks the tenant's
row (``SELECT ... FOR UPDATE``, see ``orchestrator/service/auth.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from orchestrator.errors import StoreError
from orchestrator.retry import with_backoff
from orchestrator.secrets import hide_password, scrub

__all__ = [
    "DEFAULT_DB_URL",
    "SWEEP_STATES",
    "FINISHED_STATES",
    "Base",
    "Tenant",
    "Token",
    "ServiceSweep",
    "ServiceDBError",
    "default_db_url",
    "make_engine",
    "session_scope",
    "run_in_session",
    "is_unavailable",
]

DEFAULT_DB_URL = "sqlite:///lorasweep-data/lorasweep.db"  # the ledger's default database too
SQLITE_TIMEOUT_S = 5.0  # busy timeout: how long a write waits for another process's lock
PG_CONNECT_TIMEOUT_S = 10
PG_LOCK_TIMEOUT_MS = 5000
TRIES = 5  # attempts of one unit of work on transient errors (run_in_session)
BACKOFF_S = 0.05
BACKOFF_CAP_S = 1.0

SweepState = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
SWEEP_STATES: tuple[str, ...] = (
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
    "interrupted",
)
FINISHED_STATES: tuple[str, ...] = ("completed", "failed", "cancelled")
ACTIVE_STATES: tuple[str, ...] = ("queued", "running")  # what counts against a tenant's quota

T = TypeVar("T")

# constraint names fixed, so Alembic revisions name them the same on sqlite and PostgreSQL
_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class Tenant(Base):
    """A team sharing the service; its monthly dollar quota (None: unlimited)."""

    __tablename__ = "service_tenants"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    quota_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_unix: Mapped[float] = mapped_column(Float)


class Token(Base):
    """A bearer token of a tenant, stored as the sha256 hex of the token (tokens are 32 random
    bytes, so a plain hash is enough: nothing to brute-force), never the token itself."""

    __tablename__ = "service_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("service_tenants.name"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(8))  # first 8 chars after ``lsw_``, for listing
    created_unix: Mapped[float] = mapped_column(Float)
    revoked_unix: Mapped[float | None] = mapped_column(Float, nullable=True)


class ServiceSweep(Base):
    """A submitted sweep: its spec as validated, its place in the queue, its driver."""

    __tablename__ = "service_sweeps"
    # the ledger's sweep id ({name}-{YYYYmmdd-HHMMSS}-{4 hex}): the same key in lorasweep_sweeps
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("service_tenants.name"))
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20), default="queued")  # one of SWEEP_STATES
    budget_usd: Mapped[float] = mapped_column(Float)
    predicted_first_rung_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the validated spec as submitted, data paths resolved to absolute paths on the server
    spec_yaml: Mapped[str] = mapped_column(Text)
    experiment: Mapped[str] = mapped_column(String(400))  # MLflow experiment TENANT/NAME
    created_unix: Mapped[float] = mapped_column(Float)
    started_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    driver_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # the driver process's start time (from /proc), so a reused PID is not taken for it
    driver_started_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(200), nullable=True)  # a Ray Job's id
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # driver launches: 1 + resumes
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        Index("ix_service_sweeps_tenant_created", "tenant", "created_unix"),
        Index("ix_service_sweeps_state_created", "state", "created_unix"),
    )


class ServiceDBError(StoreError):
    """The service database failed (after retries where the error was transient): one line
    naming the cause and the URL with its password hidden. ``unavailable`` is True when the
    database could not be reached at all (the API answers 503)."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


# --- engines -----------------------------------------------------------------------------------
def default_db_url() -> str:
    """``LORASWEEP_SERVICE_DB``, or the sqlite file in the data folder: ``LORASWEEP_DATA`` or
    ``lorasweep-data/`` (as every other command finds it, ``orchestrator/results_home.py``)."""
    from orchestrator.results_home import service_db

    return os.environ.get("LORASWEEP_SERVICE_DB") or service_db(None, _data_env())


def default_data_dir() -> Path:
    """Where the service's drivers keep a sweep's files: ``LORASWEEP_DATA`` or
    ``lorasweep-data/``, resolved."""
    from orchestrator.results_home import data_dir

    return data_dir(_data_env()).resolve()


def _data_env() -> Path | None:
    from orchestrator.results_home import DATA_ENV

    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None


def _sqlite_setup(busy_ms: int) -> Callable:
    def on_connect(dbapi_connection, _record) -> None:
        # we begin transactions ourselves (see _sqlite_begin): pysqlite's own implicit BEGIN
        # comes too late (at the first write) for a read-then-write admission to be atomic
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return on_connect


def _sqlite_begin(conn) -> None:
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str | URL) -> Engine:
    """An engine for the service database: sqlite in WAL mode with a busy timeout (its folder
    created), PostgreSQL with a connect timeout and a lock timeout. Raises ``ServiceDBError``
    for a malformed URL or a missing driver."""
    safe = hide_password(str(url))
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            timeout_s = float(parsed.query.get("timeout", SQLITE_TIMEOUT_S))
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                parsed.difference_update_query(["timeout"]),
                connect_args={"timeout": timeout_s, "check_same_thread": False},
                pool_pre_ping=True,
            )
            event.listen(engine, "connect", _sqlite_setup(int(timeout_s * 1000)))
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        connect_args: dict[str, Any] = {}
        if backend == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
            if "connect_timeout" not in parsed.query:
                connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
            if "options" not in parsed.query:
                connect_args["options"] = f"-c lock_timeout={PG_LOCK_TIMEOUT_MS}"
        # a pool big enough for the API's worker threads (FastAPI runs sync routes on up to 40)
        return create_engine(
            parsed, connect_args=connect_args, pool_pre_ping=True, pool_size=20, max_overflow=30
        )
    except (ArgumentError, ImportError, ValueError) as exc:
        raise ServiceDBError(
            f"--db: cannot open {safe} ({type(exc).__name__}: {exc}); check the URL (e.g. "
            "sqlite:///lorasweep-data/lorasweep.db or postgresql+psycopg://user@host/db) and "
            "that its database driver is installed",
            unavailable=True,
        ) from None


# --- sessions ----------------------------------------------------------------------------------
def _cause(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0].strip()}" if lines else type(orig).__name__


def is_unavailable(exc: SQLAlchemyError) -> bool:
    """The database could not be reached or is busy: worth another try, a 503 if it persists."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError)


def _translate(engine: Engine, exc: SQLAlchemyError, what: str, tries: int = 1) -> ServiceDBError:
    url = engine.url.render_as_string(hide_password=False)
    cause = " ".join(scrub(_cause(exc), url).splitlines())
    plural = "try" if tries == 1 else "tries"
    return ServiceDBError(
        f"service database: {what} failed after {tries} {plural} on {hide_password(url)}: {cause}",
        unavailable=is_unavailable(exc),
    )


@contextmanager
def session_scope(
    engine: Engine, *, immediate: bool = False, what: str = "transaction"
) -> Iterator[Session]:
    """One transaction: commits when the block ends, rolls back on an error; SQLAlchemy errors
    come out as ``ServiceDBError`` (password hidden). ``immediate`` takes sqlite's write lock at
    the start (``BEGIN IMMEDIATE``), for read-then-write work that must not interleave; on
    PostgreSQL lock rows with ``with_for_update()`` instead."""
    bind = engine.execution_options(sqlite_immediate=True) if immediate else engine
    session = Session(bind=bind, expire_on_commit=False)
    try:
        with session.begin():
            yield session
    except SQLAlchemyError as exc:
        raise _translate(engine, exc, what) from exc
    finally:
        session.close()


def run_in_session(
    engine: Engine, work: Callable[[Session], T], *, what: str, immediate: bool = False
) -> T:
    """``work(session)`` in one transaction (``session_scope``), again after a backoff while
    the error is transient (a locked sqlite, a dropped PostgreSQL connection, a lock timeout).
    ``work`` must be safe to repeat: it runs again from the start in a fresh transaction."""

    def once() -> T:
        bind = engine.execution_options(sqlite_immediate=True) if immediate else engine
        with Session(bind=bind, expire_on_commit=False) as session, session.begin():
            return work(session)

    def again(exc: Exception) -> bool:
        return isinstance(exc, SQLAlchemyError) and is_unavailable(exc)

    def giveup(exc: Exception, attempts: int) -> Exception | None:
        if not isinstance(exc, SQLAlchemyError):
            return None
        return _translate(engine, exc, what, attempts)

    return with_backoff(
        once, tries=TRIES, first_s=BACKOFF_S, cap_s=BACKOFF_CAP_S, again=again, giveup=giveup
    )
