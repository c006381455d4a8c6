"""The API's request and response bodies (pydantic), kept apart from the ORM models in ``db.py``:
what ``/openapi.json`` documents and what the routes return."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

SweepStateName = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]


class SweepSubmit(BaseModel):
    """``POST /v1/sweeps`` as JSON; the same spec may be sent as YAML text instead
    (``Content-Type: application/yaml``)."""

    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any] = Field(
        description="the sweep spec, as in a sweep YAML (at least name and budget_usd); data "
        "paths resolve on the server, relative ones against its working directory",
        examples=[{"name": "demo", "budget_usd": 0.01}],
    )


class SweepCreated(BaseModel):
    id: str = Field(description="the sweep's id: the handle for status, events, cancel, promote")
    state: Literal["queued"]
    budget_usd: float
    predicted_first_rung_usd: float | None = Field(
        description="the cheapest trial's predicted cost up to its first early-stopping rung"
    )


def _row_model() -> type[BaseModel]:
    """``TrialRow``: ``lorasweep leaderboard``'s row (``orchestrator.leaderboard.Row``) as a
    pydantic model, field for field, so the API's rows can never drift from the CLI's."""
    import dataclasses
    import typing

    from orchestrator.leaderboard import Row

    hints = typing.get_type_hints(Row)
    return create_model(
        "TrialRow",
        __doc__="One trial of the leaderboard (``lorasweep leaderboard``'s columns).",
        **{
            f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(Row)
        },
    )


TrialRow = _row_model()


class MlflowInfo(BaseModel):
    tracking_uri: str = Field(description="where the sweep's runs are, password hidden")
    experiment_id: str | None
    parent_run_id: str | None


class SweepSummary(BaseModel):
    id: str
    name: str
    state: SweepStateName
    budget_usd: float
    spent_usd: float
    created_unix: float
    started_unix: float | None
    ended_unix: float | None
    end_reason: str | None


class SweepStatus(BaseModel):
    id: str
    name: str
    state: SweepStateName
    budget_usd: float
    spent_usd: float = Field(description="what the sweep spent, from the ledger")
    reserved_usd: float = Field(description="what its open trials may still spend")
    remaining_usd: float = Field(description="budget_usd - spent_usd - reserved_usd")
    predicted_first_rung_usd: float | None
    trials: list[TrialRow] = Field(description="the leaderboard, best first")
    best: TrialRow | None
    end_reason: str | None
    mlflow: MlflowInfo
    experiment: str = Field(description="the MLflow experiment, TENANT/NAME")
    created_unix: float
    started_unix: float | None
    ended_unix: float | None
    cancel_requested: bool
    attempts: int = Field(description="driver launches: 1, plus one per resume")


class SweepList(BaseModel):
    sweeps: list[SweepSummary]


class CancelAccepted(BaseModel):
    id: str
    state: SweepStateName
    cancel_requested: bool


class Promoted(BaseModel):
    model: str = Field(description="the registered model's name")
    version: str
    alias: str
    test_score: float | None


class TenantUsage(BaseModel):
    tenant: str
    quota_usd: float | None = Field(description="monthly quota; null: unlimited")
    spent_usd_this_month: float = Field(description="spend of sweeps created this UTC month")
    committed_usd: float = Field(
        description="what queued and running sweeps may still spend: budget less spend so far"
    )


class Health(BaseModel):
    status: Literal["ok"]
    db: Literal["ok"]


class ErrorDetail(BaseModel):
    """Every error: a code, a message saying what to fix, and the field when there is one."""

    model_config = ConfigDict(extra="allow")
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    detail: ErrorDetail


class ProgressEvent(BaseModel):
    """One Server-Sent Event's ``data`` (event ``progress``): a line the driver printed."""

    model_config = ConfigDict(extra="allow")
    line: str
    ts_unix: float | None = None
