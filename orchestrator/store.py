"""The service's SQL store: the budget ledger, persisted as it happens.

Every reservation, ceiling raise, spend report and settlement is written in its own transaction,
so a crashed or restarted sweep loses nothing it spent. Works on any SQLAlchemy URL (sqlite by
default, PostgreSQL in production; keep it in its own database: MLflow's and Optuna's tables
collide).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, create_engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from orchestrator.errors import LorasweepError


class Base(DeclarativeBase):
    pass


class SweepRow(Base):
    __tablename__ = "lorasweep_sweeps"
    sweep_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    cap_usd: Mapped[float] = mapped_column(Float)
    created_unix: Mapped[float] = mapped_column(Float)


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


@dataclass(frozen=True)
class Totals:
    cap_usd: float
    spent_usd: float
    reserved_usd: float

    @property
    def remaining_usd(self) -> float:
        return self.cap_usd - self.spent_usd - self.reserved_usd


class Store:
    """Scoped sessions over one SQLAlchemy URL; tables are created on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = create_engine(url, pool_pre_ping=True)
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise LorasweepError(
                f"storage.service_db: cannot open {url.split('@')[-1]!r} "
                f"({type(exc).__name__}); check the URL and that the server "
                "runs"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Commit on success, roll back on error, translate driver errors."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise LorasweepError(f"ledger store error: {type(exc).__name__}: {exc}") from exc
        finally:
            session.close()

    # --- writes ----------------------------------------------------------------------------
    def create_sweep(self, sweep_id: str, name: str, cap_usd: float) -> None:
        with self.session() as s:
            s.merge(
                SweepRow(sweep_id=sweep_id, name=name, cap_usd=cap_usd, created_unix=time.time())
            )

    def save_account(
        self,
        sweep_id: str,
        key: str,
        *,
        ceiling_usd: float,
        spent_usd: float,
        settled: bool,
        predicted_usd: float | None = None,
        spend_kind: str | None = None,
    ) -> None:
        now = time.time()
        with self.session() as s:
            row = s.get(AccountRow, (sweep_id, key))
            if row is None:
                row = AccountRow(sweep_id=sweep_id, key=key, predicted_usd=predicted_usd)
                s.add(row)
            row.ceiling_usd, row.spent_usd, row.settled, row.updated_unix = (
                ceiling_usd,
                spent_usd,
                settled,
                now,
            )
            if predicted_usd is not None:
                row.predicted_usd = predicted_usd
            if spend_kind:
                s.add(
                    SpendRow(
                        sweep_id=sweep_id, key=key, cost_usd=spent_usd, at_unix=now, kind=spend_kind
                    )
                )

    def save_calibration(self, model: str, accelerator: str, timings: dict[str, float]) -> None:
        now = time.time()
        with self.session() as s:
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

    # --- reads -----------------------------------------------------------------------------
    def calibration(self, model: str, accelerator: str) -> dict[str, float]:
        with self.session() as s:
            rows = s.scalars(
                select(CalibrationRow).where(
                    CalibrationRow.model == model, CalibrationRow.accelerator == accelerator
                )
            ).all()
        return {r.name: r.value for r in rows}

    def totals(self, sweep_id: str) -> Totals:
        with self.session() as s:
            sweep = s.get(SweepRow, sweep_id)
            if sweep is None:
                raise LorasweepError(f"SWEEP: no ledger for {sweep_id!r} in {self.url}")
            rows = s.scalars(select(AccountRow).where(AccountRow.sweep_id == sweep_id)).all()
        spent = sum(r.spent_usd for r in rows)
        reserved = sum(max(r.ceiling_usd - r.spent_usd, 0.0) for r in rows if not r.settled)
        return Totals(sweep.cap_usd, spent, reserved)

    def accounts(self, sweep_id: str) -> list[AccountRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(AccountRow)
                    .where(AccountRow.sweep_id == sweep_id)
                    .order_by(AccountRow.updated_unix)
                ).all()
            )

    def spend_history(self, sweep_id: str) -> list[tuple[float, float]]:
        """(unix time, total spent so far) after each recorded spend."""
        with self.session() as s:
            rows = s.scalars(
                select(SpendRow)
                .where(SpendRow.sweep_id == sweep_id)
                .order_by(SpendRow.at_unix, SpendRow.id)
            ).all()
        latest: dict[str, float] = {}
        out = []
        for r in rows:
            latest[r.key] = r.cost_usd
            out.append((r.at_unix, sum(latest.values())))
        return out

    def sweep_ids(self) -> list[str]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(SweepRow.sweep_id).order_by(
                        func.coalesce(SweepRow.created_unix, 0).desc()
                    )
                ).all()
            )
