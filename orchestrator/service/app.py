"""The service's HTTP API: ``create_app(settings, runner)`` builds the FastAPI app.

Routes are thin (``routes_sweeps.py``, ``routes_tenant.py``): the library does the work, with
auth and the database as dependencies. Every error is JSON ``{"detail": {"code", "message",
"field"?}}``: 401 for a missing, wrong or revoked token (with ``WWW-Authenticate: Bearer``), 404
for a sweep that is not the tenant's (never 403, never its data), 422 naming the field, 403
``quota_exceeded``, 409 for an action the sweep's state does not allow, 503 when the database or
the preflight cannot be reached. A bug answers 500 with no detail, its cause in the server's log
(secrets redacted). Nothing here imports torch: the preflight runs in worker processes
(``validate.py``) and sweeps in driver processes (``runner.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.errors import StoreError
from orchestrator.secrets import redact
from orchestrator.service import validate
from orchestrator.service.auth import authenticate
from orchestrator.service.db import ServiceDBError, make_engine
from orchestrator.service.schemas import ErrorBody, Health

__all__ = ["ServiceSettings", "ApiError", "create_app", "TenantDep", "DepsDep"]

log = logging.getLogger("lorasweep.service")

MAX_BODY_BYTES = 1 << 20  # a spec is a few KiB; a MiB leaves room and refuses YAML bombs early
SSE_POLL_S = 0.5  # how often an events stream looks for new lines
SSE_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies and clients from timing out


@dataclass
class ServiceSettings:
    """What the API needs to know. ``base_dir``: where relative data paths of submitted specs
    resolve (the server's working directory)."""

    db_url: str
    engine: Engine | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    max_body_bytes: int = MAX_BODY_BYTES
    sse_poll_s: float = SSE_POLL_S
    sse_keepalive_s: float = SSE_KEEPALIVE_S
    warm_preflight: bool = True  # start the preflight workers (and their torch) at startup


class ApiError(Exception):
    """An answer other than success: HTTP ``status`` with ``{"detail": {"code", "message",
    "field"?, ...}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers, self.extra = headers, extra

    def body(self) -> dict:
        detail = {"code": self.code, "message": self.message}
        if self.field is not None:
            detail["field"] = self.field
        return {"detail": detail | self.extra}


def error(status: int, code: str, message: str, **kwargs) -> ApiError:
    return ApiError(status, code, message, **kwargs)


# responses every authenticated route may give, for /openapi.json
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no token, a wrong one, or a revoked one"},
    422: {"model": ErrorBody, "description": "a malformed request, naming the field"},
    503: {"model": ErrorBody, "description": "the service database is unreachable"},
}


# --- dependencies ------------------------------------------------------------------------------
bearer = HTTPBearer(
    auto_error=False, description="a token from `lorasweep tokens create --tenant T`"
)


class Deps:
    """What routes share: the engine, the runner, the ledger's store, the settings."""

    def __init__(self, settings: ServiceSettings, runner, engine: Engine) -> None:
        self.settings, self.runner, self.engine = settings, runner, engine
        self._store = None
        self._store_lock = threading.Lock()

    def store(self):
        """The ledger's store over the same database (opened on first use: it creates the
        ledger's tables if they are missing)."""
        with self._store_lock:
            if self._store is None:
                from orchestrator.store import Store

                self._store = Store(self.settings.db_url)
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self.engine.dispose()


def deps(request: Request) -> Deps:
    return request.app.state.deps


DepsDep = Annotated[Deps, Depends(deps)]


def current_tenant(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """The tenant of the request's bearer token; 401 otherwise."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None:
        raise error(
            401,
            "unauthorized",
            "send Authorization: Bearer TOKEN (make one with lorasweep tokens create --tenant T)",
            headers=challenge,
        )
    tenant = authenticate(deps(request).engine, creds.credentials)
    if tenant is None:
        raise error(
            401,
            "unauthorized",
            "the token is wrong or revoked; ask for a new one (lorasweep tokens create)",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]


# --- error handlers ----------------------------------------------------------------------------
def _field_of(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field_of(e.get("loc", ())), "message": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"field": "request", "message": "invalid request"}
        body = ApiError(
            422, "invalid_request", first["message"], field=first["field"], errors=errors
        ).body()
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        body = ApiError(exc.status_code, code, message).body()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StoreError)  # ServiceDBError, and the ledger store's errors
    async def _db_down(_request: Request, exc: StoreError) -> JSONResponse:
        log.error("service database error: %s", redact(str(exc)))
        body = ApiError(
            503, "database_unavailable", "the service database is unavailable; retry shortly"
        ).body()
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(SQLAlchemyError)
    async def _db_raw(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        return await _db_down(request, ServiceDBError(str(exc)))

    @app.exception_handler(validate.Unavailable)
    async def _preflight_down(_request: Request, exc: validate.Unavailable) -> JSONResponse:
        log.error("preflight unavailable: %s", exc)
        body = ApiError(503, "preflight_unavailable", str(exc)).body()
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # a bug: the cause goes to the log (redacted), the client gets no internals
        log.error(
            "unexpected error on %s %s: %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            redact(str(exc)),
            exc_info=(type(exc), exc, None),
        )
        body = ApiError(500, "internal_error", "unexpected server error (logged)").body()
        return JSONResponse(body, status_code=500)


# --- the app -----------------------------------------------------------------------------------
def create_app(settings: ServiceSettings, runner) -> FastAPI:
    """The API over ``settings.db_url`` (migrated already: ``lorasweep serve`` does it), with
    ``runner`` (``orchestrator.service.runner.Runner``, or a fake with the same methods) started
    at startup and stopped at shutdown."""
    from orchestrator.service import routes_sweeps, routes_tenant

    engine = settings.engine or make_engine(settings.db_url)
    state = Deps(settings, runner, engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.warm_preflight:
            validate.warm()
        runner.start()
        try:
            yield
        finally:
            runner.stop()
            validate.shutdown()
            state.close()

    app = FastAPI(
        title="lorasweep service",
        version="1",
        description="Budget-capped LoRA sweeps for teams: submit a sweep spec, follow it, "
        "promote its best adapter. Each tenant has hashed bearer tokens and a monthly dollar "
        "quota enforced at admission against the ledger's spend.",
        lifespan=lifespan,
    )
    app.state.deps = state
    _install_handlers(app)

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": ErrorBody, "description": "the database is unreachable"}},
        tags=["service"],
    )
    def healthz(d: DepsDep) -> Health:
        """Liveness and the database's reachability (no token needed)."""
        try:
            with d.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise ServiceDBError(f"health check: {type(exc).__name__}") from None
        return Health(status="ok", db="ok")

    app.include_router(routes_sweeps.router)
    app.include_router(routes_tenant.router)
    return app
