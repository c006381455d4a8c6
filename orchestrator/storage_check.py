"""Every storage URL of a sweep, opened before a cent is spent (``make_plan``: ``lorasweep
validate``, and ``run`` before its base-model eval).

- A SQL URL (``storage.optuna_storage``, ``storage.service_db``, an MLflow backend store in
  ``storage.mlflow_tracking_uri``): a sqlite file must sit in a writable folder, and an existing
  file must be a SQLite database; any other database is connected to (``CONNECT_TIMEOUT_S``) and
  closed again. Nothing is written.
- MLflow over http(s): ``<uri>/health`` must answer (credentials from the URL or from
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``).
- MLflow on a folder (a path or ``file://``), and ``storage.data_dir``: the folder is writable,
  or, where ``run`` creates it, its nearest existing parent is. Checking never creates a folder.

- On a Ray cluster (``storage.ray_address``, ``RAY_ADDRESS`` as a Ray Job's driver has it, or
  ``LORASWEEP_RAY_ADDRESS`` as ``lorasweep serve --ray-address`` sets it), nothing of a sweep may
  live on one node's disk: ``storage.ray_storage`` (Tune's storage: trial checkpoints, the
  adapters the driver uploads) must be a folder given by its absolute path (one every node mounts
  there) or an object-store URI that pyarrow's filesystems open; the ledger's database
  (``storage.service_db``, opened by an actor on any node) must not be a relative sqlite path.

Every refusal names the spec field and shows URLs with their passwords hidden.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from orchestrator.errors import SpecError
from orchestrator.secrets import hide_password, scrub

CONNECT_TIMEOUT_S = 5
# pyarrow.fs schemes Tune's storage_path takes (pyarrow.fs.FileSystem.from_uri)
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
CLUSTER_ENV = "LORASWEEP_RAY_ADDRESS"  # set by `lorasweep serve --ray-address`
_SQL_BACKENDS = ("sqlite", "postgresql", "mysql", "mariadb", "mssql", "oracle")
_SQL_EXAMPLES = "e.g. sqlite:///lorasweep-data/x.db or postgresql://user@host:5432/db"


def check_storage(spec) -> None:
    """Refuse, naming the field, any storage URL of ``spec`` that cannot be opened."""
    from orchestrator.sweep import storage_urls

    data_dir, tracking, optuna_url, service_db = storage_urls(spec)
    check_folder("storage.data_dir", Path(data_dir), creatable=True)
    check_tracking_uri("storage.mlflow_tracking_uri", tracking, Path(data_dir))
    check_database("storage.optuna_storage", optuna_url, Path(data_dir))
    check_database("storage.service_db", service_db, Path(data_dir))
    address = cluster_address(spec)
    if address:
        check_cluster_storage(spec, address)


def cluster_address(spec) -> str | None:
    """The Ray cluster the sweep runs on, or None for a local Ray of this machine."""
    return (
        spec.storage.ray_address
        or os.environ.get(CLUSTER_ENV)
        or os.environ.get("RAY_ADDRESS")  # a Ray Job's driver, `ray job submit`
        or None
    )


def tune_storage(spec) -> str:
    """Tune's ``storage_path`` of the sweep: ``storage.ray_storage`` (a folder every node reads
    or an object-store URI), else ``<data_dir>/ray`` as an absolute path (one machine)."""
    if spec.storage.ray_storage:
        uri = spec.storage.ray_storage
        return uri if "://" in uri else str(Path(uri).expanduser())
    return str((spec.storage.data_dir / "ray").resolve())


def check_cluster_storage(spec, address: str) -> None:
    """On a Ray cluster every node must reach the sweep's storage: refuse, before a cent is
    spent, a Tune storage only the driver sees and a ledger in a relative sqlite file."""
    shown = hide_password(address)
    where = f"this sweep runs on the Ray cluster at {shown}"
    fix = (
        "set storage.ray_storage to a folder every node mounts at the same absolute path (NFS, "
        "e.g. /mnt/shared/lorasweep/ray) or to an object-store URI (e.g. s3://bucket/lorasweep)"
    )
    uri = spec.storage.ray_storage
    if not uri:
        raise SpecError(
            "storage.ray_storage",
            f"{where}, where trials on other nodes cannot write their checkpoints into this "
            f"machine's {tune_storage(spec)} (nor the driver read them back to upload the "
            f"adapters); {fix}",
        )
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "file":
        path = Path(unquote(urlsplit(uri).path))
        check_folder("storage.ray_storage", path, creatable=True)
    elif scheme:
        if scheme not in OBJECT_STORE_SCHEMES:
            raise SpecError(
                "storage.ray_storage",
                f"unsupported scheme {scheme!r} in {hide_password(uri)}; use a shared folder's "
                f"absolute path or one of {', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}",
            )
    else:
        path = Path(uri).expanduser()
        if not path.is_absolute():
            raise SpecError(
                "storage.ray_storage",
                f"{uri} is a relative path: each node would resolve it against its own working "
                f"directory; {where}: give the shared folder's absolute path",
            )
        check_folder("storage.ray_storage", path, creatable=True)
    from sqlalchemy.engine import make_url

    from orchestrator.sweep import storage_urls

    service_db = storage_urls(spec)[3]
    parsed = make_url(service_db)
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and not Path(database).is_absolute():
        raise SpecError(
            "storage.service_db",
            f"{hide_password(service_db)} is a sqlite file relative to whichever node opens it "
            f"(the ledger's actor may run on any node; {where}); use a database server "
            "(postgresql://user@host:5432/lorasweep) or an absolute path on shared storage",
        )


def check_folder(field: str, folder: Path, creatable: bool = False) -> None:
    """``folder`` is a writable folder, or (``creatable``) its nearest existing parent is."""
    folder = folder.expanduser()
    if folder.exists() or not creatable:
        target = folder
    else:
        target = next(p for p in folder.absolute().parents if p.exists())
    if not target.exists():
        raise SpecError(field, f"folder {target} does not exist; create it or fix the path")
    if not target.is_dir():
        raise SpecError(field, f"{target} is a file, not a folder; fix the path")
    if not os.access(target, os.W_OK | os.X_OK):
        raise SpecError(field, f"folder {target} is not writable; fix its permissions or the path")


def check_tracking_uri(field: str, uri: str, data_dir: Path) -> None:
    """An MLflow tracking URI: a SQL backend store, an http(s) server or a local folder."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme.split("+", 1)[0] in _SQL_BACKENDS:
        check_database(field, uri, data_dir)
    elif scheme in ("http", "https"):
        check_http(field, uri)
    elif scheme in ("", "file"):
        path = Path(unquote(urlsplit(uri).path)) if scheme else Path(uri)
        check_folder(field, path, creatable=True)  # MLflow's file store creates its folder
    else:
        raise SpecError(
            field,
            f"unsupported scheme {scheme!r} in {hide_password(uri)}; use sqlite:///path/mlflow.db, "
            "postgresql://..., http(s)://your-mlflow-server or a folder",
        )


def check_database(field: str, url: str, data_dir: Path) -> None:
    """A SQLAlchemy URL that can be opened: a sqlite file in a writable folder, or a server that
    accepts a connection."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SpecError(
            field, f"{hide_password(url)!r} is not a SQLAlchemy URL ({_SQL_EXAMPLES})"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(field, parsed.database, data_dir)
    else:
        _connect(field, url, parsed)


def _check_sqlite(field: str, database: str | None, data_dir: Path) -> None:
    """The sqlite file exists as a database, or its folder is writable (the embedded data_dir:
    its nearest existing parent, since ``run`` creates it)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return  # in-memory, or a sqlite URI filename: nothing on disk to check
    path = Path(database).expanduser()
    if path.is_dir():
        raise SpecError(field, f"{path} is a folder; give the path of a database file")
    if path.exists():
        _open_sqlite(field, path)
        if not os.access(path, os.W_OK):
            raise SpecError(field, f"{path} is not writable; fix its permissions or the path")
        return
    creatable = path.parent.resolve() == data_dir.expanduser().resolve()
    check_folder(field, path.parent, creatable=creatable)


def _open_sqlite(field: str, path: Path) -> None:
    """Read an existing sqlite file's schema, read-only: refuse one that is not a database."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            raise SpecError(
                field,
                f"{path} is not a database ({exc}); point the URL at a new file or at a "
                "database lorasweep made",
            ) from None
        # busy or locked (a sweep writing it), or a WAL file not yet readable: it exists, fine


def _connect(field: str, url: str, parsed) -> None:
    """Open a connection to a database server and close it; nothing is written."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import NoSuchModuleError
    from sqlalchemy.pool import NullPool

    shown = hide_password(url)
    backend = parsed.get_backend_name()
    timeout = {"connect_timeout": CONNECT_TIMEOUT_S} if backend in _SQL_BACKENDS[1:4] else {}
    try:
        engine = create_engine(url, connect_args=timeout, poolclass=NullPool)
    except NoSuchModuleError:
        raise SpecError(
            field, f"unknown database scheme {parsed.drivername!r} in {shown} ({_SQL_EXAMPLES})"
        ) from None
    except ImportError as exc:
        raise SpecError(
            field,
            f"the driver for {parsed.drivername} is not installed ({exc.name}); install it "
            "(for PostgreSQL: pip install 'psycopg[binary]') or fix the URL",
        ) from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver's error: the message says which
        raise SpecError(
            field,
            f"cannot connect to {shown} ({scrub(_first_line(exc), url)}); start the database, "
            "create it, or fix the URL",
        ) from None
    finally:
        engine.dispose()


def _first_line(exc: Exception) -> str:
    """The first line of a driver's message (SQLAlchemy wraps it as ``exc.orig``)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_http(field: str, uri: str) -> None:
    """An MLflow server answers ``<uri>/health``; refused if unreachable, failing (5xx) or
    refusing the credentials (401/403)."""
    import urllib.error
    import urllib.request

    shown = hide_password(uri)
    try:
        request = _health_request(uri)
        urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SpecError(
                field,
                f"{shown} refuses the credentials (HTTP {exc.code}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
            ) from None
        if exc.code >= 500:
            raise SpecError(
                field, f"{shown} answers HTTP {exc.code}; check the MLflow server or the URL"
            ) from None
        # another status: a server answers (one behind a path prefix may not serve /health)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = scrub(str(getattr(exc, "reason", exc)), uri)
        raise SpecError(
            field,
            f"cannot reach MLflow at {shown} ({reason}); start the server "
            "(mlflow server --host 0.0.0.0 --port 5000) or fix the URL",
        ) from None


def _health_request(uri: str):
    """GET ``<uri>/health`` with the URL's credentials moved into an Authorization header."""
    import base64
    import urllib.request

    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    bare = urlunsplit(parts._replace(netloc=host, query="", fragment=""))
    request = urllib.request.Request(bare.rstrip("/") + "/health")
    user = unquote(parts.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = unquote(parts.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    return request
