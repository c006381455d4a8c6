"""A submitted spec, checked as ``lorasweep validate`` checks it, without torch in the API process.

Two stages: the spec's own rules (``orchestrator.spec.parse_spec``: pydantic, field names, data
paths resolved against the server's working directory) run here, in the API process, in
milliseconds; the preflight (``orchestrator.preflight.make_plan``: the data files read, the model
built on the meta device, prices, storage, the budget against the cheapest first rung) imports
torch and transformers, so it runs in a pool of worker processes started with ``spawn`` (a fork
of a threaded server is unsafe, and a spawned worker inherits none of its state). Workers live as
long as the API, so torch is imported once per worker, not per request.

Every refusal comes back as ``Invalid(field, message)``: the dotted spec field and how to fix it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import LorasweepError, SpecError
from orchestrator.secrets import redact

__all__ = [
    "Valid",
    "Invalid",
    "Unavailable",
    "parse_body_yaml",
    "validate_spec",
    "validate_spec_async",
    "warm",
    "shutdown",
]

# the preflight of a cached model takes ~0.5 s; the embedded model's first use converts its GGUF
# file (~70 s measured on 2 busy cores), and a remote MLflow check may wait 5 s
PLAN_TIMEOUT_S = 300.0
WORKERS = 2  # the preflight is CPU-bound and rare; more workers would mostly hold torch in memory
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]-]*): ")  # LorasweepError messages start "field: ..."


@dataclass(frozen=True)
class Valid:
    """A spec that passed: its name, budget, the prediction, and its YAML as the driver runs it
    (data paths absolute on the server)."""

    name: str
    budget_usd: float
    predicted_first_rung_usd: float | None
    spec_yaml: str


@dataclass(frozen=True)
class Invalid:
    """A refused spec: the dotted field to fix and how."""

    field: str
    message: str


class Unavailable(Exception):
    """The preflight could not run (its worker died or timed out): a 503, not the user's fault."""


def _field_of(exc: LorasweepError) -> tuple[str, str]:
    if isinstance(exc, SpecError):
        return exc.field, str(exc).removeprefix(f"{exc.field}: ")
    text = redact(str(exc))
    m = _FIELD.match(text)
    if m:
        return m.group(1), text[m.end() :]
    return "spec", text


def parse_body_yaml(text: str) -> Any:
    """YAML text to Python objects, duplicate keys refused (as ``lorasweep validate``); raises
    ``SpecError`` on text that is not YAML."""
    from orchestrator.spec import _load_yaml

    try:
        return _load_yaml(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError("spec", f"not valid YAML: {' '.join(str(exc).split())}") from None


def _resolved(raw: Any, base_dir: Path, service_db_url: str):
    """The spec parsed (field errors as ``SpecError``), its paths absolute under ``base_dir``."""
    from orchestrator.spec import parse_spec

    spec = parse_spec(raw, base_dir)
    storage = spec.storage
    if storage.service_db and storage.service_db != service_db_url:
        raise SpecError(
            "storage.service_db",
            "the service keeps every sweep's ledger in its own database (that is how quotas see "
            "the spend); remove this key",
        )
    if storage.ray_address:
        raise SpecError(
            "storage.ray_address",
            "the service decides where sweeps run (lorasweep serve --ray-address); remove this key",
        )
    data_dir = storage.data_dir.expanduser()
    if not data_dir.is_absolute():
        storage = storage.model_copy(update={"data_dir": base_dir / data_dir})
        spec = spec.model_copy(update={"storage": storage})
    return spec


def _check_files(spec) -> None:
    """Refuse data files that do not exist on the server, naming the field (before the slower
    preflight, which would say the same)."""
    if spec.data.source == "embedded":
        return
    for field in ("train", "validation", "test"):
        path = getattr(spec.data, field)
        if path is not None and not Path(path).is_file():
            raise SpecError(
                f"data.{field}",
                f"file {path} not found on the server (relative paths resolve against the "
                "server's working directory); upload it there or give its absolute path",
            )


# --- the preflight in worker processes --------------------------------------------------------
def _plan(spec_json: dict, base_dir: str) -> dict:
    """Worker side: ``make_plan`` of the (already resolved) spec; a plain dict back."""
    from orchestrator.preflight import make_plan
    from orchestrator.spec import parse_spec

    try:
        spec = parse_spec(spec_json, Path(base_dir))
        plan = make_plan(spec)
        cheapest, dearest = plan.extremes(spec.search_space)
        return {
            "ok": True,
            "predicted_first_rung_usd": plan.admission_usd({}, cheapest),
            "dearest_first_rung_usd": plan.admission_usd({}, dearest),
        }
    except LorasweepError as exc:
        field, message = _field_of(exc)
        return {"ok": False, "field": field, "message": message}


_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
PARENT_CHECK_S = 1.0  # how often a worker checks that the API process is still there
STOP_WAIT_S = 5.0  # at shutdown, how long a worker may finish its preflight before SIGTERM


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit once the API process is gone. A SIGKILLed API runs no shutdown,
    and an orphaned worker would keep torch (~400 MB) in memory for good."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="lorasweep-preflight-parent", daemon=True).start()


def _executor() -> cf.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(
                max_workers=WORKERS,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
        return _pool


def _stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Stop ``pool`` and make sure its workers are gone: a worker busy with a preflight gets
    ``STOP_WAIT_S`` to finish, then SIGTERM."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # private, stable API
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in workers:
        proc.join(timeout=STOP_WAIT_S)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=STOP_WAIT_S)


def _drop_pool(broken: cf.ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    _stop_pool(broken)


def _warm() -> bool:
    import orchestrator.preflight  # noqa: F401 - torch, transformers: imported once per worker

    return True


def warm() -> None:
    """Start the preflight workers and their imports now (at the API's start), so the first
    submission does not wait for torch to load."""
    pool = _executor()
    for _ in range(WORKERS):
        pool.submit(_warm)


def shutdown() -> None:
    """Stop the preflight workers (the API's shutdown)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        _stop_pool(pool)


def _prepare(raw: Any, base_dir: Path, service_db_url: str):
    """The spec's own rules (fast, in this process): ``(spec, its JSON)`` or ``Invalid``."""
    try:
        spec = _resolved(raw, base_dir, service_db_url)
        _check_files(spec)
    except LorasweepError as exc:
        return Invalid(*_field_of(exc))
    return spec, spec.model_dump(mode="json")


def _finish(spec, spec_json: dict, out: dict) -> Valid | Invalid:
    if not out["ok"]:
        return Invalid(out["field"], out["message"])
    return Valid(
        name=spec.name,
        budget_usd=float(spec.budget_usd),
        predicted_first_rung_usd=out["predicted_first_rung_usd"],
        spec_yaml=yaml.safe_dump(spec_json, sort_keys=False),
    )


def _timed_out(timeout_s: float) -> Unavailable:
    return Unavailable(f"the spec's preflight took over {timeout_s:g} s; try again")


def _died(pool: cf.ProcessPoolExecutor) -> Unavailable:
    _drop_pool(pool)
    return Unavailable("the preflight's worker process died; try again")


def validate_spec(
    raw: Any, *, base_dir: Path, service_db_url: str, timeout_s: float = PLAN_TIMEOUT_S
) -> Valid | Invalid:
    """Check ``raw`` (the spec as parsed from JSON or YAML) as ``lorasweep validate`` does.
    Raises ``Unavailable`` when the preflight worker dies or overruns ``timeout_s``."""
    prepared = _prepare(raw, base_dir, service_db_url)
    if isinstance(prepared, Invalid):
        return prepared
    spec, spec_json = prepared
    pool = _executor()
    try:
        out = pool.submit(_plan, spec_json, str(base_dir)).result(timeout=timeout_s)
    except cf.TimeoutError:
        raise _timed_out(timeout_s) from None
    except cf.process.BrokenProcessPool:
        raise _died(pool) from None
    return _finish(spec, spec_json, out)


async def validate_spec_async(
    raw: Any, *, base_dir: Path, service_db_url: str, timeout_s: float = PLAN_TIMEOUT_S
) -> Valid | Invalid:
    """``validate_spec`` for the API's event loop: the wait for the preflight holds no thread
    (the API's threads serve status reads; 40 submissions waiting on 2 workers would take them
    all)."""
    prepared = _prepare(raw, base_dir, service_db_url)
    if isinstance(prepared, Invalid):
        return prepared
    spec, spec_json = prepared
    pool = _executor()
    try:
        future = pool.submit(_plan, spec_json, str(base_dir))
        out = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except (asyncio.TimeoutError, cf.TimeoutError):
        raise _timed_out(timeout_s) from None
    except cf.process.BrokenProcessPool:
        raise _died(pool) from None
    return _finish(spec, spec_json, out)
