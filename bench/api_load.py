"""API load: 50 concurrent clients submitting and polling sweeps against the service on
PostgreSQL, for at least 60 s.

    .venv/bin/python bench/api_load.py --out bench/results/api_load.json   # ~90 s, CPU-heavy

Sets up: a fresh PostgreSQL database ``lorasweep_bench_<random>`` (created and dropped; admin URL
``--pg-url``, default ``LORASWEEP_TEST_PG_URL`` or postgresql://postgres@127.0.0.1:5432/test),
migrated like ``lorasweep serve`` does, one token for each of ``--tenants`` tenants (unlimited
quotas: the benchmark measures the API, not refusals), and a uvicorn server in a subprocess of
this script on a free loopback port. That server is the real app (``create_app``: real auth, real
validation with the preflight in its worker processes, real quota admission under the tenant's
row lock, real status reads from the service tables, the ledger and MLflow) with one substitute:

    FAKE RUNNER. Where the cluster would be, ``FakeRunner`` marks queued sweeps running, then
    completed a few seconds later, without training anything or starting any driver. It is
    there so the benchmark measures the API and its database, not Ray.

Each client (a thread with its own ``httpx.Client``) loops: submit the embedded demo spec as
YAML (``POST /v1/sweeps``; the spec validates on the server like ``lorasweep validate``), then
poll its status (``GET /v1/sweeps/{id}``) ``--polls`` times ``--poll-gap-s`` apart, list its
tenant's sweeps once. After ``--duration-s`` every tenant's list is read again: a sweep answered
201 but not listed is lost. Writes ``{"clients", "requests", "errors", "p50_ms", "p99_ms",
"lost_sweeps", "db"}`` (p50/p99 of the status reads), with the submissions' latencies and counts
next to them. Targets: zero errors, zero lost sweeps, p99 < 200 ms for status reads.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "examples" / "demo.yaml"
PG_URL = os.environ.get("LORASWEEP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
FAKE_RUN_S = 3.0  # a fake sweep's "run": queued -> running at the next tick, completed after this
FAKE_TICK_S = 0.5


# --- the server side: the real app with a fake runner ------------------------------------------
class FakeRunner:
    """A stand-in for ``orchestrator.service.runner.Runner`` where the cluster would be: it moves
    sweeps queued -> running -> completed on a timer and trains nothing (no driver, no Ray, no
    spend). Only for this benchmark."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fake-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, sweep_id: str) -> None:
        from orchestrator.service.db import ServiceSweep, run_in_session

        def work(s) -> None:
            row = s.get(ServiceSweep, sweep_id)
            if row is not None and row.state in ("queued", "running"):
                row.cancel_requested = True
                row.state, row.ended_unix = "cancelled", time.time()

        run_in_session(self.engine, work, what="fake cancel")

    def events(self, sweep_id: str, after_id: int = 0) -> list[tuple[int, dict]]:
        return [(1, {"line": f"fake runner: {sweep_id} trains nothing"})][after_id:]

    def promote(self, sweep_id: str) -> dict:
        from orchestrator.errors import LorasweepError

        raise LorasweepError("promote: the fake runner trained nothing")

    def _loop(self) -> None:
        from sqlalchemy import update

        from orchestrator.service.db import ServiceSweep, run_in_session

        def tick(s) -> None:
            now = time.time()
            s.execute(
                update(ServiceSweep)
                .where(ServiceSweep.state == "queued")
                .values(state="running", started_unix=now, attempts=1)
            )
            s.execute(
                update(ServiceSweep)
                .where(
                    ServiceSweep.state == "running", ServiceSweep.started_unix < now - FAKE_RUN_S
                )
                .values(state="completed", ended_unix=now, end_reason="fake runner: no training")
            )

        while not self._stop.is_set():
            self._wake.wait(FAKE_TICK_S)
            self._wake.clear()
            try:
                run_in_session(self.engine, tick, what="fake runner tick")
            except Exception as exc:  # noqa: BLE001 - keep ticking; the benchmark counts errors
                print(f"fake runner: {exc}", file=sys.stderr, flush=True)


def serve_fake(db_url: str, port: int, cwd: Path) -> None:
    """The real app with the fake runner, in this process (the benchmark's subprocess)."""
    import uvicorn

    from orchestrator.service.app import ServiceSettings, create_app
    from orchestrator.service.db import make_engine

    os.chdir(cwd)
    engine = make_engine(db_url)
    app = create_app(
        ServiceSettings(db_url=db_url, engine=engine, base_dir=cwd), FakeRunner(engine)
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the client side ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies_ms: dict[str, list[float]] = {"status": [], "submit": [], "list": []}
        self.errors = Counter()
        self.submitted: dict[str, set[str]] = {}

    def add(self, kind: str, ms: float) -> None:
        with self.lock:
            self.latencies_ms[kind].append(ms)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] += 1


def _client(url, tenant, token, spec_text, args, tally: Tally, stop: threading.Event) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=120.0, headers=headers) as http:

        def call(kind: str, method: str, path: str, **kw):
            t0 = time.perf_counter()
            try:
                r = http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                tally.error(f"{kind}: {type(exc).__name__}")
                return None
            tally.add(kind, (time.perf_counter() - t0) * 1000)
            if r.status_code >= 300:
                tally.error(f"{kind}: HTTP {r.status_code}")
                return None
            return r

        n = 0
        while not stop.is_set():
            n += 1
            text = spec_text.replace("name: demo", f"name: load-{tenant}-{n}", 1)
            r = call(
                "submit",
                "POST",
                "/v1/sweeps",
                content=text.encode(),
                headers={"Content-Type": "application/yaml"},
            )
            if r is None:
                continue
            sweep_id = r.json()["id"]
            with tally.lock:
                tally.submitted.setdefault(tenant, set()).add(sweep_id)
            for _ in range(args.polls):
                if stop.wait(args.poll_gap_s):
                    break
                r = call("status", "GET", f"/v1/sweeps/{sweep_id}")
                if r is not None and r.json()["id"] != sweep_id:
                    tally.error("status: wrong sweep")
            call("list", "GET", "/v1/sweeps", params={"limit": 20})


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--polls", type=int, default=10, help="status reads after each submission")
    ap.add_argument("--poll-gap-s", type=float, default=0.2)
    ap.add_argument("--pg-url", default=PG_URL, help="PostgreSQL admin URL (creates a database)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api_load.json")
    ap.add_argument("--serve-fake", nargs=2, metavar=("PORT", "CWD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_fake:
        port, cwd = args.serve_fake  # the database URL comes by environment: no password in ps
        serve_fake(os.environ["LORASWEEP_SERVICE_DB"], int(port), Path(cwd))
        return

    import tempfile

    import httpx
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from orchestrator.service import migrations
    from orchestrator.service.auth import create_token
    from orchestrator.service.db import make_engine
    from orchestrator.store import Store

    admin_url = make_url(args.pg_url)
    name = f"lorasweep_bench_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        version = conn.exec_driver_sql("SHOW server_version").scalar()
    db_url = admin_url.set(database=name).render_as_string(hide_password=False)
    server = None
    try:
        engine = make_engine(db_url)
        migrations.upgrade(engine)
        Store(db_url).close()
        tokens = {f"team-{i}": create_token(engine, f"team-{i}")[1] for i in range(args.tenants)}
        engine.dispose()

        cwd = Path(tempfile.mkdtemp(prefix="lorasweep-api-load-"))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(cwd / "server.log", "wb")  # noqa: SIM115 - closed with the server
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-fake", str(port), str(cwd)],
            env={**os.environ, "LORASWEEP_SERVICE_DB": db_url},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{(cwd / 'server.log').read_text()}")
            time.sleep(0.3)
        spec_text = DEMO_SPEC.read_text()
        # one submission first: the preflight workers load torch and the embedded model once
        first = httpx.post(
            f"{url}/v1/sweeps",
            content=spec_text.encode(),
            headers={
                "Authorization": f"Bearer {tokens['team-0']}",
                "Content-Type": "application/yaml",
            },
            timeout=600,
        )
        first.raise_for_status()

        tally = Tally()
        tally.submitted["team-0"] = {first.json()["id"]}
        stop = threading.Event()
        names = sorted(tokens)
        threads = [
            threading.Thread(
                target=_client,
                args=(url, t, tokens[t], spec_text, args, tally, stop),
                daemon=True,
            )
            for t in (names[i % len(names)] for i in range(args.clients))
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.duration_s)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        wall_s = time.monotonic() - t0

        lost = 0
        with httpx.Client(base_url=url, timeout=60) as http:
            for tenant, ids in tally.submitted.items():
                listed = http.get(
                    "/v1/sweeps",
                    params={"limit": 1000},
                    headers={"Authorization": f"Bearer {tokens[tenant]}"},
                ).json()["sweeps"]
                lost += len(ids - {s["id"] for s in listed})
    finally:
        if server is not None and server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
        with admin.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()

    lat = tally.latencies_ms
    requests = sum(len(v) for v in lat.values()) + sum(tally.errors.values())
    result = {
        "clients": args.clients,
        "requests": requests,
        "errors": sum(tally.errors.values()),
        "p50_ms": round(_pct(lat["status"], 0.50), 2),
        "p99_ms": round(_pct(lat["status"], 0.99), 2),
        "lost_sweeps": lost,
        "db": f"postgresql {version}",
        # context for the numbers above
        "duration_s": round(wall_s, 1),
        "tenants": args.tenants,
        "runner": "fake (sweeps marked running, then completed; nothing trains)",
        "status_reads": len(lat["status"]),
        "submissions": len(lat["submit"]),
        "submit_p50_ms": round(_pct(lat["submit"], 0.50), 1),
        "submit_p99_ms": round(_pct(lat["submit"], 0.99), 1),
        "list_p99_ms": round(_pct(lat["list"], 0.99), 2),
        "status_mean_ms": round(statistics.fmean(lat["status"]), 2) if lat["status"] else None,
        "error_kinds": dict(tally.errors),
        "cpus": os.cpu_count(),
    }
    print(f"{'metric':<16}{'value':>24}")
    for key in (
        "clients", "duration_s", "requests", "errors", "status_reads", "p50_ms", "p99_ms",
        "submissions", "submit_p50_ms", "submit_p99_ms", "lost_sweeps", "db",
    ):  # fmt: skip
        print(f"{key:<16}{result[key]!s:>24}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
