"""``/v1/tenant``: the calling tenant's quota and where it stands this month."""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.service.app import AUTH_RESPONSES, DepsDep, TenantDep
from orchestrator.service.auth import usage
from orchestrator.service.schemas import TenantUsage

router = APIRouter(prefix="/v1", tags=["tenant"])


@router.get("/tenant", response_model=TenantUsage, responses=AUTH_RESPONSES)
def tenant_usage(tenant: TenantDep, d: DepsDep) -> TenantUsage:
    """The quota (null: unlimited), the spend of this UTC month's sweeps, and what queued and
    running sweeps may still spend. A new sweep is admitted while committed_usd +
    spent_usd_this_month + its budget_usd <= quota_usd."""
    u = usage(d.engine, tenant)
    return TenantUsage(
        tenant=u.tenant,
        quota_usd=u.quota_usd,
        spent_usd_this_month=u.spent_usd_this_month,
        committed_usd=u.committed_usd,
    )
