"""Tenants, their bearer tokens, and quota admission.

Tokens are ``lsw_`` + 32 random bytes (urlsafe base64); only their sha256 is stored (a token has
256 bits of entropy, so a plain hash cannot be brute-forced and needs no salt or slow KDF, as
GitHub does with its tokens), with the first 8 characters after the prefix for listing.

Quota: a tenant's ``quota_usd`` caps, per UTC calendar month, what its sweeps spent this month
plus what its queued and running sweeps may still spend (their budget less their spend so far,
from the ledger's accounts in the same database). A submission is admitted when

    committed_usd + spent_usd_this_month + budget_usd <= quota_usd

and the check and the new sweep's row are one transaction holding the tenant's lock (a row lock
on PostgreSQL, sqlite's write lock from ``BEGIN IMMEDIATE``), so concurrent submissions of one
tenant are admitted one after the other and cannot overrun the quota together.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.errors import LorasweepError
from orchestrator.service.db import (
    ACTIVE_STATES,
    ServiceDBError,
    ServiceSweep,
    Tenant,
    Token,
    run_in_session,
)
from orchestrator.store import AccountRow

__all__ = [
    "TOKEN_PREFIX",
    "TokenInfo",
    "Usage",
    "QuotaExceeded",
    "new_token",
    "hash_token",
    "create_token",
    "list_tokens",
    "revoke_token",
    "authenticate",
    "usage",
    "admit",
    "spent_by_sweep",
]

TOKEN_PREFIX = "lsw_"
TOKEN_BYTES = 32
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
ID_TRIES = 5  # new sweep ids drawn on a collision (same name, same second, same 4 hex digits)


@dataclass(frozen=True)
class TokenInfo:
    id: int
    tenant: str
    prefix: str
    created_unix: float
    revoked_unix: float | None
    quota_usd: float | None


@dataclass(frozen=True)
class Usage:
    """A tenant's standing against its quota (``quota_usd`` None: unlimited)."""

    tenant: str
    quota_usd: float | None
    spent_usd_this_month: float
    committed_usd: float

    def room_usd(self) -> float | None:
        """What a new sweep's budget may be at most; None: unlimited."""
        if self.quota_usd is None:
            return None
        return self.quota_usd - self.spent_usd_this_month - self.committed_usd


class QuotaExceeded(LorasweepError):
    """A submission's budget does not fit the tenant's quota this month."""

    def __init__(self, usage: Usage, budget_usd: float) -> None:
        self.usage, self.budget_usd = usage, budget_usd
        room = max(usage.room_usd() or 0.0, 0.0)
        super().__init__(
            f"budget_usd: ${budget_usd:g} does not fit tenant {usage.tenant!r}'s quota of "
            f"${usage.quota_usd:g} this month (spent ${usage.spent_usd_this_month:.4f}, committed "
            f"to queued and running sweeps ${usage.committed_usd:.4f}, room ${room:.4f}); lower "
            "budget_usd, cancel a queued sweep, or ask for a larger quota"
        )

    def detail(self) -> dict:
        room = max(self.usage.room_usd() or 0.0, 0.0)
        return {
            "code": "quota_exceeded",
            "field": "budget_usd",
            "message": str(self),
            "quota_usd": self.usage.quota_usd,
            "spent_usd_this_month": self.usage.spent_usd_this_month,
            "committed_usd": self.usage.committed_usd,
            "budget_usd": self.budget_usd,
            "room_usd": room,
        }


# --- tokens ------------------------------------------------------------------------------------
def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The stored form of a token: its sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_tenant_name(tenant: str) -> str:
    if not _TENANT.fullmatch(tenant):
        raise LorasweepError(
            f"--tenant: {tenant[:80]!r} will not do: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (it names the tenant's MLflow experiments "
            "TENANT/NAME), e.g. --tenant team-a"
        )
    return tenant


def create_token(engine: Engine, tenant: str, quota_usd: float | None = None) -> tuple[int, str]:
    """A new token of ``tenant``, the tenant created if new; ``quota_usd`` (given) sets its
    monthly quota. Returns (token id, token): the token is shown once and stored hashed."""
    check_tenant_name(tenant)
    if quota_usd is not None and not quota_usd >= 0:  # also refuses NaN
        raise LorasweepError(f"--quota-usd: must be >= 0 dollars (got {quota_usd})")
    token = new_token()
    now = time.time()

    def work(s: Session) -> int:
        row = s.get(Tenant, tenant)
        if row is None:
            s.add(Tenant(name=tenant, quota_usd=quota_usd, created_unix=now))
        elif quota_usd is not None:
            row.quota_usd = quota_usd
        tok = Token(
            tenant=tenant,
            token_hash=hash_token(token),
            prefix=token[len(TOKEN_PREFIX) :][:8],
            created_unix=now,
        )
        s.add(tok)
        s.flush()
        return tok.id

    return run_in_session(engine, work, what="token creation", immediate=True), token


def list_tokens(engine: Engine) -> list[TokenInfo]:
    def work(s: Session) -> list[TokenInfo]:
        rows = s.execute(
            select(Token, Tenant.quota_usd)
            .join(Tenant, Tenant.name == Token.tenant)
            .order_by(Token.id)
        ).all()
        return [
            TokenInfo(t.id, t.tenant, t.prefix, t.created_unix, t.revoked_unix, quota)
            for t, quota in rows
        ]

    return run_in_session(engine, work, what="read of tokens")


def revoke_token(engine: Engine, token_id: int) -> bool:
    """Revoke token ``token_id`` (requests with it get 401 from now on); False if there is no
    such token. Revoking twice keeps the first time."""

    def work(s: Session) -> bool:
        tok = s.get(Token, token_id)
        if tok is None:
            return False
        if tok.revoked_unix is None:
            tok.revoked_unix = time.time()
        return True

    return run_in_session(engine, work, what="token revocation")


def authenticate(engine: Engine, token: str) -> str | None:
    """The tenant of a valid, unrevoked ``token``; None otherwise."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)

    def work(s: Session) -> str | None:
        row = s.execute(
            select(Token.tenant, Token.revoked_unix).where(Token.token_hash == digest)
        ).first()
        return row.tenant if row is not None and row.revoked_unix is None else None

    return run_in_session(engine, work, what="token check")


# --- quota -------------------------------------------------------------------------------------
def month_start_unix(now_unix: float | None = None) -> float:
    """The start of the current UTC calendar month."""
    now = datetime.fromtimestamp(time.time() if now_unix is None else now_unix, timezone.utc)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def spent_by_sweep(s: Session, sweep_ids: list[str]) -> dict[str, float]:
    """What each sweep spent, from the ledger's accounts (0 for a sweep without a ledger yet)."""
    if not sweep_ids:
        return {}
    rows = s.execute(
        select(AccountRow.sweep_id, func.coalesce(func.sum(AccountRow.spent_usd), 0.0))
        .where(AccountRow.sweep_id.in_(sweep_ids))
        .group_by(AccountRow.sweep_id)
    ).all()
    out = dict.fromkeys(sweep_ids, 0.0)
    out.update({sid: float(total) for sid, total in rows})
    return out


def _usage(s: Session, tenant: Tenant, now_unix: float) -> Usage:
    month = month_start_unix(now_unix)
    rows = s.execute(
        select(
            ServiceSweep.id, ServiceSweep.state, ServiceSweep.budget_usd, ServiceSweep.created_unix
        )
        .where(ServiceSweep.tenant == tenant.name)
        .where((ServiceSweep.created_unix >= month) | ServiceSweep.state.in_(ACTIVE_STATES))
    ).all()
    spent = spent_by_sweep(s, [r.id for r in rows])
    this_month = sum(spent[r.id] for r in rows if r.created_unix >= month)
    # an active sweep created last month: only what it may still spend counts (its spend so far
    # was last month's)
    committed = sum(max(r.budget_usd - spent[r.id], 0.0) for r in rows if r.state in ACTIVE_STATES)
    return Usage(tenant.name, tenant.quota_usd, this_month, committed)


def usage(engine: Engine, tenant: str) -> Usage:
    """The tenant's quota, spend this month and commitments."""

    def work(s: Session) -> Usage:
        row = s.get(Tenant, tenant)
        if row is None:
            raise LorasweepError(f"tenant {tenant!r} does not exist")
        return _usage(s, row, time.time())

    return run_in_session(engine, work, what="read of the tenant's usage")


def new_sweep_id(name: str, now_unix: float) -> str:
    """``{name}-{YYYYmmdd-HHMMSS}-{4 hex}``, the ledger's id format (UTC)."""
    stamp = datetime.fromtimestamp(now_unix, timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def admit(
    engine: Engine,
    tenant: str,
    *,
    name: str,
    budget_usd: float,
    predicted_first_rung_usd: float | None,
    spec_yaml: str,
) -> ServiceSweep:
    """Queue a new sweep of ``tenant`` if its budget fits the quota (else ``QuotaExceeded``):
    the check and the insert are one transaction under the tenant's lock."""

    def work(s: Session) -> ServiceSweep:
        now = time.time()
        row = s.execute(
            select(Tenant).where(Tenant.name == tenant).with_for_update()  # no-op on sqlite
        ).scalar_one_or_none()
        if row is None:
            raise LorasweepError(f"tenant {tenant!r} does not exist")
        use = _usage(s, row, now)
        if row.quota_usd is not None and (
            use.committed_usd + use.spent_usd_this_month + budget_usd > row.quota_usd + 1e-12
        ):
            raise QuotaExceeded(use, budget_usd)
        sweep_id = new_sweep_id(name, now)
        while s.get(ServiceSweep, sweep_id) is not None:
            sweep_id = new_sweep_id(name, now)
        sweep = ServiceSweep(
            id=sweep_id,
            tenant=tenant,
            name=name,
            state="queued",
            budget_usd=budget_usd,
            predicted_first_rung_usd=predicted_first_rung_usd,
            spec_yaml=spec_yaml,
            experiment=f"{tenant}/{name}",
            created_unix=now,
            attempts=0,
            cancel_requested=False,
        )
        s.add(sweep)
        s.flush()
        return sweep

    for attempt in range(1, ID_TRIES + 1):
        try:
            return run_in_session(engine, work, what="admission", immediate=True)
        except ServiceDBError as exc:
            # another tenant's sweep of the same name took the same id in the same second
            if not isinstance(exc.__cause__, IntegrityError) or attempt == ID_TRIES:
                raise
    raise AssertionError("unreachable")
