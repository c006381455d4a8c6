"""Default output shows lorasweep's own lines; ``LORASWEEP_VERBOSE=1`` brings the libraries' back.

Applied once, at the CLI's start (:func:`apply`), before any library is imported: environment
variables (inherited by every process started from here: Ray's local cluster, its workers, the
base-eval task, a service's drivers), logging levels and warning filters. Each entry names the
line it removes, as a user saw it running the README (issue 22):

- Ray's "Token authentication is enabled for this Ray cluster" (the auth stays on: only the
  notice goes), Tune's "... may be a performance bottleneck" timings and its TensorBoard
  logger's "You are trying to log an invalid value";
- Tune's "Trial task failed" traceback for a trial the watchdog killed with ``ray.kill`` (our
  own line says ``budget_killed``); any other trial failure keeps its traceback;
- Optuna's "A new study created in RDB" (Optuna sets its logger to INFO when it is imported,
  so its level is set right after that import);
- MLflow's INFO lines ("Creating initial MLflow database tables", "Validating input example"),
  its warnings and its "Downloading artifacts" bars;
- transformers' FutureWarnings and advisories, its "Loading weights" / "Writing model shards"
  bars, the GGUF "Converting and de-quantizing" bars (tqdm: ``TQDM_DISABLE``), hub bars.

Nothing here touches errors: a library's ERROR records stay (but for the killed-trial
traceback above), and exceptions and our own console lines are never filtered.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable

VERBOSE_ENV = "LORASWEEP_VERBOSE"

# setdefault: a value the user exported wins
QUIET_ENV = {
    "TQDM_DISABLE": "1",  # every tqdm bar (GGUF conversion, weight loading, shard writing)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # hub bars; transformers' own bars follow it
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TUNE_WARN_THRESHOLD_S": "3600",  # Tune's "operation took 0.5 s ... bottleneck"
    # child Python processes (Ray workers, drivers of the service): no FutureWarnings
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}
QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "You are trying to log an invalid value (ray/tune/system_metrics=...)": Tune's TensorBoard
    # logger on results it cannot plot (we own the MLflow logging)
    "ray.tune.logger.tensorboardx": logging.ERROR,
    "mlflow": logging.ERROR,
    "alembic": logging.WARNING,
}
TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"


def verbose() -> bool:
    """``LORASWEEP_VERBOSE`` set to anything but empty / 0 / false / no."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def apply() -> None:
    """Quiet the libraries for this process and the processes it starts (once)."""
    if verbose():
        os.environ[VERBOSE_ENV] = "1"  # one meaning for every reader (orchestrator/sweep.py)
        return
    os.environ.pop(VERBOSE_ENV, None)  # "0" is quiet here and everywhere after
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(mlflow|pydantic)(\.|$)")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger(TUNE_CONTROLLER_LOGGER).addFilter(_not_a_killed_trial)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport({"optuna": _quiet_optuna, "ray": _quiet_ray}))
    if "optuna" in sys.modules:
        _quiet_optuna(sys.modules["optuna"])


def _quiet_optuna(optuna) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _quiet_ray(_ray) -> None:
    # Ray configures its loggers on import: set ours again after it
    for name, level in QUIET_LOGGERS.items():
        if name.startswith("ray"):
            logging.getLogger(name).setLevel(level)


def _not_a_killed_trial(record: logging.LogRecord) -> bool:
    """False for Tune's traceback of a trial actor ended by ``ray.kill`` (the watchdog's
    kill, reported by our own ``budget_killed`` line); every other record passes."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (
        exc is not None
        and type(exc).__name__ == "ActorDiedError"
        and "killed by `ray.kill`" in str(exc)
    )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a function on a package right after its first import (libraries that set their
    logging up on import, undoing a level set before)."""

    def __init__(self, hooks: dict[str, Callable]) -> None:
        self.hooks = dict(hooks)

    def find_spec(self, fullname, path, target=None):
        hook = self.hooks.pop(fullname, None)
        if hook is None:
            return None
        spec = importlib.util.find_spec(fullname)  # the other finders (this hook is gone)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_quiet(module) -> None:
            exec_module(module)
            try:
                hook(module)
            except Exception:  # noqa: BLE001 - quieting must never break a command
                pass

        spec.loader.exec_module = exec_then_quiet
        return spec
