"""``/v1/sweeps``: submit, list, status, cancel, promote, events. A sweep of another tenant is
404, the same answer as a sweep that does not exist: its existence is not disclosed."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.errors import LorasweepError, SpecError
from orchestrator.secrets import hide_password, redact
from orchestrator.service import validate
from orchestrator.service.app import AUTH_RESPONSES, Deps, DepsDep, TenantDep, error
from orchestrator.service.auth import QuotaExceeded, admit, spent_by_sweep
from orchestrator.service.db import FINISHED_STATES, ServiceSweep, run_in_session
from orchestrator.service.schemas import (
    CancelAccepted,
    ErrorBody,
    MlflowInfo,
    Promoted,
    SweepCreated,
    SweepList,
    SweepStatus,
    SweepSubmit,
    SweepSummary,
    TrialRow,
)

log = logging.getLogger("lorasweep.service")
router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
END_STATES = (*FINISHED_STATES, "interrupted")  # an events stream ends at these
NOT_FOUND = {404: {"model": ErrorBody, "description": "no such sweep of this tenant"}}


def _not_found(sweep_id: str):
    return error(
        404, "not_found", f"no sweep {sweep_id!r} for this tenant; list yours with GET /v1/sweeps"
    )


def _own(d: Deps, tenant: str, sweep_id: str) -> ServiceSweep:
    """The tenant's sweep ``sweep_id``, or 404 (also for another tenant's)."""
    row = run_in_session(
        d.engine,
        lambda s: s.execute(
            select(ServiceSweep).where(ServiceSweep.id == sweep_id, ServiceSweep.tenant == tenant)
        ).scalar_one_or_none(),
        what="read of sweep",
    )
    if row is None:
        raise _not_found(sweep_id)
    return row


# --- submit ------------------------------------------------------------------------------------
SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SweepSubmit.model_json_schema()},
            "application/yaml": {
                "schema": {"type": "string", "description": "the sweep YAML, as a file holds it"}
            },
        },
    }
}


def _spec_from_body(body: bytes, content_type: str) -> Any:
    """The spec as Python objects from a JSON ``{"spec": {...}}`` or a YAML body; 422 naming
    the field otherwise."""
    kind = content_type.split(";", 1)[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise error(422, "invalid_spec", "the body is not UTF-8 text", field="spec") from None
    if kind in YAML_TYPES:
        try:
            return validate.parse_body_yaml(text)
        except SpecError as exc:
            message = str(exc).removeprefix(f"{exc.field}: ")
            raise error(422, "invalid_spec", message, field=exc.field) from None
    if kind in ("application/json", "") or kind.endswith("+json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise error(
                422, "invalid_request", f"the body is not JSON: {exc}", field="body"
            ) from None
        try:
            return SweepSubmit.model_validate(data).spec
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "body"
            raise error(
                422,
                "invalid_request",
                f'{first["msg"]}; send {{"spec": {{...}}}} or the YAML with '
                "Content-Type: application/yaml",
                field=loc,
            ) from None
    raise error(
        415,
        "unsupported_media_type",
        f'Content-Type {kind!r}: send application/json ({{"spec": {{...}}}}) or '
        "application/yaml (the sweep YAML)",
    )


@router.post(
    "",
    status_code=201,
    response_model=SweepCreated,
    openapi_extra=SUBMIT_BODY,
    responses={
        **AUTH_RESPONSES,
        403: {"model": ErrorBody, "description": "quota_exceeded: the budget does not fit"},
        413: {"model": ErrorBody, "description": "the body is over 1 MiB"},
        415: {"model": ErrorBody, "description": "neither JSON nor YAML"},
        503: {"model": ErrorBody, "description": "the database or the preflight is unavailable"},
    },
)
async def submit(request: Request, tenant: TenantDep, d: DepsDep) -> SweepCreated:
    """Submit a sweep: validated as `lorasweep validate` does (data paths are the server's),
    admitted against the tenant's monthly quota, then queued."""
    limit = d.settings.max_body_bytes
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise error(
                413, "body_too_large", f"the body is over {limit} bytes; a spec is a few KiB"
            )
    raw = _spec_from_body(body, request.headers.get("content-type", ""))
    checked = await validate.validate_spec_async(
        raw, base_dir=Path(d.settings.base_dir), service_db_url=d.settings.db_url
    )
    if isinstance(checked, validate.Invalid):
        raise error(422, "invalid_spec", checked.message, field=checked.field)
    try:
        row = await run_in_threadpool(
            admit,
            d.engine,
            tenant,
            name=checked.name,
            budget_usd=checked.budget_usd,
            predicted_first_rung_usd=checked.predicted_first_rung_usd,
            spec_yaml=checked.spec_yaml,
        )
    except QuotaExceeded as exc:
        detail = exc.detail()
        code, message = detail.pop("code"), detail.pop("message")
        raise error(403, code, message, **detail) from None
    d.runner.wake()
    return SweepCreated(
        id=row.id,
        state="queued",
        budget_usd=row.budget_usd,
        predicted_first_rung_usd=row.predicted_first_rung_usd,
    )


# --- list and status ---------------------------------------------------------------------------
@router.get("", response_model=SweepList, responses=AUTH_RESPONSES)
def list_sweeps(
    tenant: TenantDep,
    d: DepsDep,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="at most this many, newest first")
    ] = 100,
) -> SweepList:
    """The tenant's own sweeps, newest first."""

    def work(s: Session) -> list[SweepSummary]:
        rows = (
            s.execute(
                select(ServiceSweep)
                .where(ServiceSweep.tenant == tenant)
                .order_by(ServiceSweep.created_unix.desc())
                .limit(limit)
            )
            .scalars()
            .all()
        )
        spent = spent_by_sweep(s, [r.id for r in rows])
        return [
            SweepSummary(
                id=r.id,
                name=r.name,
                state=r.state,
                budget_usd=r.budget_usd,
                spent_usd=spent[r.id],
                created_unix=r.created_unix,
                started_unix=r.started_unix,
                ended_unix=r.ended_unix,
                end_reason=r.end_reason,
            )
            for r in rows
        ]

    return SweepList(sweeps=run_in_session(d.engine, work, what="read of sweeps"))


class _MlflowCache:
    """A sweep's MLflow experiment and parent run, once found (they never change), and the
    leaderboard of a finished sweep (it no longer changes either)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.parents: dict[str, Any] = {}
        self.finished_rows: dict[str, list[TrialRow]] = {}


_cache = _MlflowCache()
_MAX_CACHED = 2000


_uris: dict[str, str] = {}


def _tracking_uri(row: ServiceSweep) -> str:
    """The sweep's MLflow tracking URI, as its driver computes it (``storage_urls``); cached by
    sweep id: a stored spec never changes, and parsing its YAML on every status read costs more
    than the rest of the read."""
    uri = _uris.get(row.id)
    if uri is not None:
        return uri
    import yaml

    from orchestrator.tracking import default_tracking_uri

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    storage = (yaml.load(row.spec_yaml, Loader=loader) or {}).get("storage") or {}  # noqa: S506
    uri = storage.get("mlflow_tracking_uri") or default_tracking_uri(
        Path(storage.get("data_dir") or "lorasweep-data")
    )
    if len(_uris) > _MAX_CACHED:
        _uris.clear()
    _uris[row.id] = uri
    return uri


def _no_store_yet(uri: str) -> bool:
    """A sqlite MLflow store that does not exist yet: no runs there, and opening it would create
    it (and run MLflow's migrations) from a status read."""
    if not uri.startswith("sqlite:///"):
        return False
    return not Path(uri.removeprefix("sqlite:///")).exists()


def _mlflow(row: ServiceSweep) -> tuple[MlflowInfo, list[TrialRow]]:
    """Where the sweep's runs are, and its leaderboard (empty before its driver logged one, or
    when MLflow cannot be read: status must not fail with it)."""
    uri = _tracking_uri(row)
    info = MlflowInfo(tracking_uri=hide_password(uri), experiment_id=None, parent_run_id=None)
    if row.state == "queued" or _no_store_yet(uri):
        return info, []
    with _cache.lock:
        parent = _cache.parents.get(row.id)
        cached_rows = _cache.finished_rows.get(row.id)
    try:
        if parent is None:
            from mlflow.tracking import MlflowClient

            from orchestrator.tracking import KIND_TAG, SWEEP_TAG

            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(row.experiment)
            if exp is None:
                return info, []
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{SWEEP_TAG}` = '{row.id}' and tags.`{KIND_TAG}` = 'sweep'",
                max_results=1,
            )
            if not runs:
                return info.model_copy(update={"experiment_id": exp.experiment_id}), []
            parent = runs[0]
            with _cache.lock:
                if len(_cache.parents) > _MAX_CACHED:
                    _cache.parents.clear()
                _cache.parents[row.id] = parent
        info = info.model_copy(
            update={"experiment_id": parent.info.experiment_id, "parent_run_id": parent.info.run_id}
        )
        if cached_rows is not None:
            return info, cached_rows
        from dataclasses import asdict

        from orchestrator import leaderboard

        rows = [TrialRow(**asdict(r)) for r in leaderboard.trial_rows(uri, parent)]
        if row.state in FINISHED_STATES:
            with _cache.lock:
                if len(_cache.finished_rows) > _MAX_CACHED:
                    _cache.finished_rows.clear()
                _cache.finished_rows[row.id] = rows
        return info, rows
    except Exception as exc:  # noqa: BLE001 - MLflow down or odd: status goes on without trials
        log.warning("MLflow read for %s failed: %s", row.id, redact(f"{type(exc).__name__}: {exc}"))
        return info, []


def _best(rows: list[TrialRow]) -> TrialRow | None:
    scored = [r for r in rows if r.score is not None and r.status != "failed"]
    return scored[0] if scored else None


@router.get("/{sweep_id}", response_model=SweepStatus, responses={**AUTH_RESPONSES, **NOT_FOUND})
def sweep_status(sweep_id: str, tenant: TenantDep, d: DepsDep) -> SweepStatus:
    """The sweep's state, spend (from the ledger), leaderboard (from MLflow) and where its runs
    are."""
    row = _own(d, tenant, sweep_id)
    spent = reserved = 0.0
    try:
        totals = d.store().totals(row.id)
        spent, reserved = totals.spent_usd, totals.reserved_usd
    except LorasweepError as exc:
        if "no ledger" not in str(exc):  # a sweep whose driver has not opened its ledger yet
            raise
    info, trials = _mlflow(row)
    return SweepStatus(
        id=row.id,
        name=row.name,
        state=row.state,
        budget_usd=row.budget_usd,
        spent_usd=spent,
        reserved_usd=reserved,
        remaining_usd=row.budget_usd - spent - reserved,
        predicted_first_rung_usd=row.predicted_first_rung_usd,
        trials=trials,
        best=_best(trials),
        end_reason=row.end_reason,
        mlflow=info,
        experiment=row.experiment,
        created_unix=row.created_unix,
        started_unix=row.started_unix,
        ended_unix=row.ended_unix,
        cancel_requested=bool(row.cancel_requested),
        attempts=row.attempts or 0,
    )


# --- cancel and promote ------------------------------------------------------------------------
CONFLICT = {409: {"model": ErrorBody, "description": "the sweep's state does not allow it"}}


@router.post(
    "/{sweep_id}/cancel",
    status_code=202,
    response_model=CancelAccepted,
    responses={**AUTH_RESPONSES, **NOT_FOUND, **CONFLICT},
)
def cancel(sweep_id: str, tenant: TenantDep, d: DepsDep) -> CancelAccepted:
    """Cancel the sweep: a queued one at once; a running one's trials close inside their grants
    and what was spent stays on record (it reads ``cancelled`` once its driver has exited)."""
    row = _own(d, tenant, sweep_id)
    if row.state in ("completed", "failed"):
        raise error(
            409, "not_cancellable", f"sweep {sweep_id} is already {row.state}", state=row.state
        )
    if row.state != "cancelled":
        d.runner.cancel(sweep_id)
    row = _own(d, tenant, sweep_id)
    return CancelAccepted(id=row.id, state=row.state, cancel_requested=bool(row.cancel_requested))


@router.post(
    "/{sweep_id}/promote",
    response_model=Promoted,
    responses={**AUTH_RESPONSES, **NOT_FOUND, **CONFLICT},
)
def promote(sweep_id: str, tenant: TenantDep, d: DepsDep) -> Promoted:
    """Register the sweep's best adapter (scored on the test split) as ``TENANT.NAME`` and point
    the alias ``champion`` at it. The sweep must be completed."""
    row = _own(d, tenant, sweep_id)
    if row.state != "completed":
        raise error(
            409,
            "not_completed",
            f"sweep {sweep_id} is {row.state}; only a completed sweep can be promoted",
            state=row.state,
        )
    try:
        out = d.runner.promote(sweep_id)
    except LorasweepError as exc:
        raise error(409, "promote_failed", redact(str(exc))) from None
    return Promoted(
        model=str(out["model"]),
        version=str(out["version"]),
        alias=str(out["alias"]),
        test_score=out.get("test_score"),
    )


# --- events ------------------------------------------------------------------------------------
def _sse(event_id: int, data: dict) -> str:
    return f"id: {event_id}\nevent: progress\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get(
    "/{sweep_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `id: N`, `event: progress`, `data: "
            '{"line": ..., "ts_unix": ...}` for each progress line the driver printed; the '
            "stream ends once the sweep has ended and its log has been read",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **AUTH_RESPONSES,
        **NOT_FOUND,
    },
)
async def events(
    sweep_id: str,
    request: Request,
    tenant: TenantDep,
    d: DepsDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="resume after this event id")
    ] = None,
) -> StreamingResponse:
    """The sweep's progress lines (those `lorasweep run` prints) as Server-Sent Events, from the
    start or after `Last-Event-ID`."""
    row = await run_in_threadpool(_own, d, tenant, sweep_id)
    try:
        after = max(int(last_event_id or 0), 0)
    except ValueError:
        raise error(
            422,
            "invalid_request",
            "Last-Event-ID must be an event id (an integer)",
            field="Last-Event-ID",
        ) from None
    poll_s, keepalive_s = d.settings.sse_poll_s, d.settings.sse_keepalive_s

    def state_now() -> str:
        return run_in_session(
            d.engine,
            lambda s: s.execute(
                select(ServiceSweep.state).where(ServiceSweep.id == row.id)
            ).scalar_one(),
            what="read of sweep state",
        )

    async def stream():
        last, quiet_since = after, time.monotonic()
        yield ": lorasweep events of " + row.id + "\n\n"
        while True:
            try:
                # the state is read before the log: lines written before the end are all sent
                state = await run_in_threadpool(state_now)
                batch = await run_in_threadpool(d.runner.events, row.id, last)
            except Exception as exc:  # noqa: BLE001 - end the stream; the client reconnects
                log.warning("events of %s: %s", row.id, redact(f"{type(exc).__name__}: {exc}"))
                return
            for event_id, data in batch:
                yield _sse(event_id, data)
                last = event_id
            if batch:
                quiet_since = time.monotonic()
            if state in END_STATES:
                return
            if await request.is_disconnected():
                return
            if time.monotonic() - quiet_since > keepalive_s:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(poll_s)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
