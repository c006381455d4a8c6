"""The service's SQL store: the budget ledger, persisted as it happens.

Every reservation, ceiling change, spend report and settlement is written in its own transaction
before the ledger changes its memory (``orchestrator/budget.py``), so a crashed or restarted
sweep loses nothing it spent and its ledger is rebuilt from these rows. Works on any SQLAlchemy
URL (sqlite by default, PostgreSQL in production; keep it in its own database: MLflow's and
Optuna's tables collide).

Robustness:

- sqlite runs in WAL mode with a busy timeout (``?timeout=SECONDS`` in the URL overrides the
  default), so several processes can share one ledger file;
- PostgreSQL connections get a connect timeout and a lock timeout (unless the URL sets
  ``connect_timeout`` / ``options``), so a stuck server or lock fails loudly instead of hanging;
- transient errors (sqlite "database is locked", a dropped PostgreSQL connection, a lock timeout,
  a serialization failure: SQLAlchemy's ``OperationalError``) are retried with exponential
  backoff; whatever still fails raises ``StoreError``, one line naming the cause and the URL with
  its password hidden. Writes are whole-state (an account's row is overwritten), so a retry of a
  write whose commit did reach the server is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from orchestrator.errors import LorasweepError, StoreError
from orchestrator.retry import with_backoff

__all__ = ["Store", "StoreError", "Totals", "AccountRow", "SweepRow", "SpendRow"]

TRIES = 5  # attempts of one operation on transient errors
BACKOFF_S = 0.05  # first wait between attempts, doubled each time ...
BACKOFF_CAP_S = 1.0  # ... up to this
SQLITE_TIMEOUT_S = 2.0  # sqlite busy timeout: how long a write waits for another's lock
PG_CONNECT_TIMEOUT_S = 10
PG_LOCK_TIMEOUT_MS = 5000

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class SweepRow(Base):
    __tablename__ = "lorasweep_sweeps"
    sweep_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    cap_usd: Mapped[float] = mapped_column(Float)
    created_unix: Mapped[float] = mapped_column(Float)
    # the watchdog's enforcement allowance per running trial (added after the first release)
    allowance_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the sweep's life (added after the first release): queued | running | completed | failed |
    # cancelled | interrupted; the running driver's heartbeat (a stale one means it died); the
    # spec file it runs, for ``lorasweep resume``
    state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    driver_heartbeat_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    spec_path: Mapped[str | None] = mapped_column(String(1000), nullable=True)


class AccountRow(Base):
    """One trial's (or fixed charge's) standing: its ceiling, what it spent, whether settled."""

    __tablename__ = "lorasweep_accounts"
    sweep_id: Mapped[str] = mapped_column(ForeignKey("lorasweep_sweeps.sweep_id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    ceiling_usd: Mapped[float] = mapped_column(Float, default=0.0)
    spent_usd: Mapped[float] = mapped_column(Float, default=0.0)
    predicted_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    settled: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_unix: Mapped[float] = mapped_column(Float)
    # added after the first release (nullable: older rows read as False / None)
    revoked: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    started_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    charge: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # a fixed spend


class SpendRow(Base):
    """Spend over time: one row per report or settlement (cumulative for its account)."""

    __tablename__ = "lorasweep_spend"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(String(200), index=True)
    key: Mapped[str] = mapped_column(String(200))
    cost_usd: Mapped[float] = mapped_column(Float)
    at_unix: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(20))  # report | settle | charge


class CalibrationRow(Base):
    """A measured timing of one (model, accelerator): FLOP/s per method, startup seconds. Kept
    across sweeps so the next sweep of the same model on the same hardware starts calibrated."""

    __tablename__ = "lorasweep_calibration"
    model: Mapped[str] = mapped_column(String(500), primary_key=True)
    accelerator: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)  # flops_per_s:lora, ...
    value: Mapped[float] = mapped_column(Float)
    updated_unix: Mapped[float] = mapped_column(Float)


# what an account row holds besides its keys and time: the ledger writes all of it every time
ACCOUNT_FIELDS = (
    "ceiling_usd",
    "spent_usd",
    "predicted_usd",
    "settled",
    "revoked",
    "started_unix",
    "charge",
)


@dataclass(frozen=True)
class Totals:
    cap_usd: float
    spent_usd: float
    reserved_usd: float

    @property
    def remaining_usd(self) -> float:
        return self.cap_usd - self.spent_usd - self.reserved_usd


# --- engines, errors ---------------------------------------------------------------------------
def hide_password(url: str | URL) -> str:
    """``url`` as text with its password, if any, shown as ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def _transient(exc: SQLAlchemyError) -> bool:
    """Worth another try: locks, busy databases, dropped connections, serialization failures."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError)


def _cause(exc: BaseException) -> str:
    """The driver's error in one line: its class and the first line of its message."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0].strip()}" if lines else type(orig).__name__


def _sqlite_pragmas(busy_ms: int) -> Callable:
    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    return on_connect


def _engine(url: URL):
    """An engine for ``url`` with the timeouts above, WAL and busy timeout on sqlite."""
    if url.get_backend_name() == "sqlite":
        timeout_s = float(url.query.get("timeout", SQLITE_TIMEOUT_S))
        engine = create_engine(url, connect_args={"timeout": timeout_s}, pool_pre_ping=True)
        event.listen(engine, "connect", _sqlite_pragmas(int(timeout_s * 1000)))
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2"):
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        if "options" not in url.query:
            connect_args["options"] = f"-c lock_timeout={PG_LOCK_TIMEOUT_MS}"
    return create_engine(url, connect_args=connect_args, pool_pre_ping=True)


class Store:
    """Sessions over one SQLAlchemy URL; tables are created (and older ones given the columns
    added since) on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.safe_url = hide_password(url)
        self._password = None
        try:
            parsed = make_url(url)
            self._password = parsed.password
            self.engine = _engine(parsed)
        except (ArgumentError, ImportError) as exc:  # a malformed URL, its driver not installed
            raise StoreError(
                f"storage.service_db: cannot open {self.safe_url} ({_cause(exc)}); check the URL "
                "and that its database driver is installed"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self._retry("open", self._create_schema, schema=True)
        except StoreError as exc:
            self.engine.dispose()
            cause = self._scrub(_cause(exc.__cause__)) if exc.__cause__ else str(exc)
            raise StoreError(
                f"storage.service_db: cannot open {self.safe_url} ({cause}); "
                "check the URL and that the server runs"
            ) from None

    def close(self) -> None:
        """Close the pool's connections (the store stays usable: it reconnects on next use)."""
        self.engine.dispose()

    # --- plumbing ----------------------------------------------------------------------------
    def _create_schema(self, session: Session) -> None:
        conn = session.connection()
        Base.metadata.create_all(conn)
        inspector = inspect(conn)
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    quote = conn.dialect.identifier_preparer.quote
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(
                        f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}"
                    )

    def _scrub(self, text: str) -> str:
        """``text`` in one line, the URL's password (should a driver quote it) hidden."""
        if self._password:
            text = text.replace(self._password, "***")
        return " ".join(text.splitlines())

    def _message(self, what: str, exc: BaseException, tries: int) -> str:
        plural = "try" if tries == 1 else "tries"
        return self._scrub(
            f"ledger store: {what} failed after {tries} {plural} on {self.safe_url}: {_cause(exc)}"
        )

    def _retry(self, what: str, work: Callable[[Session], T], schema: bool = False) -> T:
        """Run ``work`` in one transaction, again after a backoff while the error is transient
        (while creating the schema, also another process's concurrent creation)."""

        def once() -> T:
            with self._sessions() as session, session.begin():
                return work(session)

        def again(exc: Exception) -> bool:
            if not isinstance(exc, SQLAlchemyError):
                return False
            racing = schema and isinstance(exc, IntegrityError | ProgrammingError)
            return _transient(exc) or racing

        def giveup(exc: Exception, attempts: int) -> Exception | None:
            if not isinstance(exc, SQLAlchemyError):
                return None
            return StoreError(self._message(what, exc, attempts))

        return with_backoff(
            once, tries=TRIES, first_s=BACKOFF_S, cap_s=BACKOFF_CAP_S, again=again, giveup=giveup
        )

    # --- writes ------------------------------------------------------------------------------
    def open_sweep(
        self, sweep_id: str, name: str, cap_usd: float, allowance_usd: float | None = None
    ) -> SweepRow:
        """The sweep's row, created if new; an existing row (a restarted ledger, a resumed sweep)
        is kept as it is: its cap, allowance and creation time."""

        def work(s: Session) -> SweepRow:
            row = s.get(SweepRow, sweep_id)
            if row is None:
                row = SweepRow(
                    sweep_id=sweep_id,
                    name=name,
                    cap_usd=cap_usd,
                    created_unix=time.time(),
                    allowance_usd=allowance_usd,
                )
                s.add(row)
            return row

        return self._retry("open sweep", work)

    def create_sweep(self, sweep_id: str, name: str, cap_usd: float) -> SweepRow:
        """Kept for callers of the first release: ``open_sweep`` without an allowance."""
        return self.open_sweep(sweep_id, name, cap_usd)

    def set_sweep(self, sweep_id: str, **values) -> None:
        """Update the sweep's row: ``state``, ``end_reason``, ``driver_heartbeat_unix``,
        ``spec_path``."""

        def work(s: Session) -> None:
            s.execute(
                update(SweepRow)
                .where(SweepRow.sweep_id == sweep_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

        self._retry("update of sweep", work)

    def claim_driver(self, sweep_id: str, stale_s: float, now_unix: float | None = None) -> bool:
        """Become the sweep's one driver: mark it running with a fresh heartbeat, unless a live
        driver (running, with a heartbeat younger than ``stale_s``) holds it. One UPDATE, so of
        two drivers claiming at once exactly one wins (sqlite's single writer; PostgreSQL
        re-checks the condition on the locked row)."""
        now = time.time() if now_unix is None else now_unix
        free = or_(
            SweepRow.state.is_(None),
            SweepRow.state != "running",
            SweepRow.driver_heartbeat_unix.is_(None),
            SweepRow.driver_heartbeat_unix < now - stale_s,
        )

        def work(s: Session) -> bool:
            done = s.execute(
                update(SweepRow)
                .where(SweepRow.sweep_id == sweep_id, free)
                .values(state="running", driver_heartbeat_unix=now)
                .execution_options(synchronize_session=False)
            )
            return done.rowcount == 1

        return self._retry("claim of sweep", work)

    def latest_sweep(self, name: str) -> SweepRow | None:
        """The newest sweep of the spec ``name``."""
        rows = self._all(
            "read of sweeps",
            select(SweepRow)
            .where(SweepRow.name == name)
            .order_by(func.coalesce(SweepRow.created_unix, 0).desc())
            .limit(1),
        )
        return rows[0] if rows else None

    def set_allowance(self, sweep_id: str, allowance_usd: float) -> None:
        def work(s: Session) -> None:
            s.execute(
                update(SweepRow)
                .where(SweepRow.sweep_id == sweep_id)
                .values(allowance_usd=allowance_usd)
                .execution_options(synchronize_session=False)
            )

        self._retry("set allowance", work)

    def save_account(self, sweep_id: str, key: str, *, spend_kind: str | None = None, **fields):
        """Overwrite one account's row with ``fields`` (those of ``ACCOUNT_FIELDS``), plus a spend
        row when ``spend_kind`` is given."""
        self.save_accounts(sweep_id, {key: fields}, spend_kind=spend_kind)

    def save_accounts(
        self, sweep_id: str, accounts: dict[str, dict], *, spend_kind: str | None = None
    ) -> None:
        """Overwrite several accounts' rows in one transaction: all are written or none. One
        UPDATE per account (an INSERT the first time): cheap enough for a heartbeat per running
        trial every few seconds."""
        now = time.time()

        def work(s: Session) -> None:
            for key, fields in accounts.items():
                values = {k: fields.get(k) for k in ACCOUNT_FIELDS} | {"updated_unix": now}
                values["settled"] = bool(values["settled"])
                changed = s.execute(
                    update(AccountRow)
                    .where(AccountRow.sweep_id == sweep_id, AccountRow.key == key)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if not changed:
                    s.add(AccountRow(sweep_id=sweep_id, key=key, **values))
                if spend_kind:
                    s.add(
                        SpendRow(
                            sweep_id=sweep_id,
                            key=key,
                            cost_usd=values["spent_usd"],
                            at_unix=now,
                            kind=spend_kind,
                        )
                    )

        self._retry(f"write of {', '.join(accounts)}", work)

    def save_calibration(self, model: str, accelerator: str, timings: dict[str, float]) -> None:
        now = time.time()

        def work(s: Session) -> None:
            for name, value in timings.items():
                s.merge(
                    CalibrationRow(
                        model=model,
                        accelerator=accelerator,
                        name=name,
                        value=float(value),
                        updated_unix=now,
                    )
                )

        self._retry("write of calibration", work)

    # --- reads -------------------------------------------------------------------------------
    def _all(self, what: str, query) -> list:
        return self._retry(what, lambda s: list(s.scalars(query).all()))

    def sweep(self, sweep_id: str) -> SweepRow | None:
        return self._retry("read of sweep", lambda s: s.get(SweepRow, sweep_id))

    def calibration(self, model: str, accelerator: str) -> dict[str, float]:
        rows = self._all(
            "read of calibration",
            select(CalibrationRow).where(
                CalibrationRow.model == model, CalibrationRow.accelerator == accelerator
            ),
        )
        return {r.name: r.value for r in rows}

    def totals(self, sweep_id: str) -> Totals:
        """What the sweep spent and what its open accounts still commit (each its ceiling plus
        the sweep's allowance, or its spend once past that), as the ledger counts them."""
        sweep = self.sweep(sweep_id)
        if sweep is None:
            raise LorasweepError(f"SWEEP: no ledger for {sweep_id!r} in {self.safe_url}")
        rows = self.accounts(sweep_id)
        allowance = sweep.allowance_usd or 0.0
        spent = sum(r.spent_usd for r in rows)
        reserved = sum(
            max(r.ceiling_usd + allowance - r.spent_usd, 0.0) for r in rows if not r.settled
        )
        return Totals(sweep.cap_usd, spent, reserved)

    def accounts(self, sweep_id: str) -> list[AccountRow]:
        return self._all(
            "read of accounts",
            select(AccountRow)
            .where(AccountRow.sweep_id == sweep_id)
            .order_by(AccountRow.updated_unix, AccountRow.key),
        )

    def spend_history(self, sweep_id: str) -> list[tuple[float, float]]:
        """(unix time, total spent so far) after each recorded spend."""
        rows = self._all(
            "read of spend history",
            select(SpendRow)
            .where(SpendRow.sweep_id == sweep_id)
            .order_by(SpendRow.at_unix, SpendRow.id),
        )
        latest: dict[str, float] = {}
        out = []
        for r in rows:
            latest[r.key] = r.cost_usd
            out.append((r.at_unix, sum(latest.values())))
        return out

    def sweep_ids(self) -> list[str]:
        return self._all(
            "read of sweeps",
            select(SweepRow.sweep_id).order_by(func.coalesce(SweepRow.created_unix, 0).desc()),
        )


def account_fields(rows: Iterable[AccountRow]) -> dict[str, dict]:
    """Each row's ``ACCOUNT_FIELDS`` by key (older rows' NULL flags read as False)."""
    out = {}
    for r in rows:
        fields = {k: getattr(r, k) for k in ACCOUNT_FIELDS}
        fields["revoked"], fields["charge"] = bool(r.revoked), bool(r.charge)
        out[r.key] = fields
    return out
