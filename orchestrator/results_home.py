"""Where a command finds a sweep's results: one rule for every command.

Results live in a data folder (default ``./lorasweep-data``, relative to the working directory):
MLflow at ``<data_dir>/mlflow.db``, the budget ledger at ``<data_dir>/lorasweep.db``. The folder
is chosen by ``--data-dir`` or ``LORASWEEP_DATA``; ``--tracking-uri`` / ``LORASWEEP_TRACKING_URI``
and ``--service-db`` / ``LORASWEEP_SERVICE_DB`` override single stores (a server, PostgreSQL).
Commands that only read never create a store: MLflow's sqlite store creates its file and tables
on first use, so a ``status`` run from the wrong folder used to leave an empty
``./lorasweep-data/mlflow.db`` behind and show an empty table. They check first and say where
they looked and how to point at a store (:func:`require_tracking_store`).
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import LorasweepError

DATA_ENV = "LORASWEEP_DATA"
TRACKING_ENV = "LORASWEEP_TRACKING_URI"
SERVICE_DB_ENV = "LORASWEEP_SERVICE_DB"
DEFAULT_DATA_DIR = Path("lorasweep-data")


def data_dir(given: Path | None) -> Path:
    """The data folder: ``--data-dir`` / ``LORASWEEP_DATA`` when given, else the default."""
    return given if given is not None else DEFAULT_DATA_DIR


def tracking_uri(given: str | None, data: Path | None) -> str:
    """MLflow's URI: ``--tracking-uri`` when given, else the data folder's sqlite file."""
    return given or f"sqlite:///{data_dir(data) / 'mlflow.db'}"


def service_db(given: str | None, data: Path | None) -> str:
    """The ledger's URL: ``--service-db`` when given, else the data folder's sqlite file."""
    return given or f"sqlite:///{data_dir(data) / 'lorasweep.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:"):
        return None
    path = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
    return None if not path or path == ":memory:" else Path(path)


def _looked(url: str, path: Path, given: bool, data: Path | None, flag: str, env: str) -> str:
    if given:
        origin = f"{flag} / {env}"
    elif data is not None:
        origin = f"--data-dir / {DATA_ENV}={data}"
    else:
        origin = f"the default ./{DEFAULT_DATA_DIR} under {Path.cwd()}"
    return f"looked for {url} ({path.resolve()}, from {origin}): no such file"


def _how_to_point() -> str:
    return (
        f"run it from the folder that holds {DEFAULT_DATA_DIR}/, or point at the data folder "
        f"with --data-dir DIR (or {DATA_ENV}=DIR), or at MLflow with --tracking-uri URI (or "
        f"{TRACKING_ENV}=URI)"
    )


def require_tracking_store(given: str | None, data: Path | None) -> str:
    """MLflow's URI for a command that reads results; raises (creating nothing) when it is a
    sqlite file that does not exist."""
    url = tracking_uri(given, data)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        where = _looked(url, path, given is not None, data, "--tracking-uri", TRACKING_ENV)
        raise LorasweepError(f"no lorasweep results here: {where}; {_how_to_point()}")
    return url


def require_ledger(given: str | None, data: Path | None) -> str:
    """The ledger's URL for a command that needs an existing sweep's ledger (resume,
    abandon); raises (creating nothing) when it is a sqlite file that does not exist."""
    url = service_db(given, data)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        where = _looked(url, path, given is not None, data, "--service-db", SERVICE_DB_ENV)
        raise LorasweepError(
            f"no lorasweep ledger here: {where}; run it from the folder that holds "
            f"{DEFAULT_DATA_DIR}/, or pass --data-dir DIR (or {DATA_ENV}=DIR), or --service-db "
            f"URL (or {SERVICE_DB_ENV}=URL)"
        )
    return url
