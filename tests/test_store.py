"""The SQL ledger: the same tests on sqlite and on PostgreSQL (the machine's server, started by
scripts/ensure-postgres.sh; set LORASWEEP_TEST_PG_URL to use another). With ``CI=true`` an
unreachable PostgreSQL fails these tests instead of skipping them."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from _ledger_db import BACKENDS, PG_URL, backend_url, replay_traffic, require_pg, state
from sqlalchemy.engine import make_url

from orchestrator.budget import Ledger
from orchestrator.errors import LorasweepError, StoreError
from orchestrator.store import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    return backend_url(request.param, tmp_path)


def _sweep() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


def _with_query(url: str, **query: str) -> str:
    return make_url(url).update_query_dict(query).render_as_string(hide_password=False)


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


# --- rebuild from SQL after a real process kill -----------------------------------------------
def test_a_killed_ledger_is_rebuilt_from_sql(store_url):
    """A child process runs ledger traffic and is SIGKILLed mid-traffic; a new Ledger on the same
    sweep reloads exactly the state after the child's last completed call (SQL is written before
    memory, so a kill between the two leaves SQL one call ahead of what was printed, never
    behind and never half-applied)."""
    sweep, seed, steps = _sweep(), 16, 100_000
    code = (
        "import sys; from _ledger_db import run_traffic_child; "
        f"run_traffic_child({store_url!r}, {sweep!r}, {seed}, {steps})"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=_child_env(), cwd=ROOT
    )
    printed = []
    for line in child.stdout:
        printed.append(json.loads(line))
        if len(printed) > 60:
            os.kill(child.pid, signal.SIGKILL)
            break
    rest = child.stdout.read().decode()
    assert child.wait(timeout=30) == -signal.SIGKILL
    printed += [json.loads(x) for x in rest.splitlines(keepends=True) if x.endswith("\n")]
    last = printed[-1]["i"]
    replay = replay_traffic(seed, last + 2)
    assert [p["state"] for p in printed] == replay[: last + 2]  # the child did what we replay

    reloaded = Ledger(cap_usd=99.0, sweep_id=sweep, store_url=store_url, allowance_usd=7.0)
    got = state(reloaded)
    assert got["cap_usd"] == 10.0  # the stored cap, not the one passed on restart
    assert got in (replay[last + 1], replay[last + 2])
    assert got["trials"] and got["snapshot"]["spent_usd"] > 0
    reloaded.close()


def test_reload_keeps_the_sweep_row(store_url):
    sweep = _sweep()
    first = Ledger(cap_usd=3.0, sweep_id=sweep, store_url=store_url, name="x")
    assert first.reserve("a", 1.0, predicted_usd=2.0)
    first.close()
    store = Store(store_url)
    created = store.sweep(sweep).created_unix
    time.sleep(0.01)
    again = Ledger(cap_usd=5.0, sweep_id=sweep, store_url=store_url, name="x")
    assert again.cap_usd == 3.0 and again.trials["a"].predicted_usd == 2.0
    assert again.reserve("a", 1.0, predicted_usd=2.0)  # a call retried after the restart
    assert not again.reserve("a", 1.5)
    assert store.sweep(sweep).created_unix == created and store.sweep(sweep).cap_usd == 3.0
    again.close()
    store.close()


def test_totals_and_history_match_the_ledger(store_url):
    sweep = _sweep()
    ledger = Ledger(cap_usd=10.0, sweep_id=sweep, store_url=store_url, allowance_usd=0.5)
    ledger.charge("baseline", 0.5)
    assert ledger.reserve("a", 2.0, predicted_usd=6.0)
    assert ledger.reserve("b", 3.0)
    ledger.update("a", 1.5)
    assert ledger.request("a", 4.0)
    ledger.settle("b", 2.5)
    snap = ledger.snapshot()
    store = Store(store_url)
    totals = store.totals(sweep)
    assert totals.cap_usd == 10.0
    assert totals.spent_usd == pytest.approx(snap["spent_usd"]) == pytest.approx(0.5 + 1.5 + 2.5)
    assert totals.reserved_usd == pytest.approx(snap["reserved_usd"]) == pytest.approx(3.0)
    assert totals.remaining_usd == pytest.approx(snap["remaining_usd"])
    accounts = {a.key: a for a in store.accounts(sweep)}
    assert accounts["a"].predicted_usd == 6.0 and not accounts["a"].settled
    assert accounts["b"].settled and accounts["b"].spent_usd == 2.5
    history = store.spend_history(sweep)
    assert [round(total, 6) for _, total in history] == [0.5, 2.0, 4.5]
    ledger.close()
    store.close()


def test_heartbeats_are_cheap(store_url):
    """A heartbeat is one UPDATE and one spend row: measured ~2-4 ms here (sqlite, PostgreSQL),
    so one ledger actor keeps up with hundreds of trials beating every 5 s. The bound below is
    loose for a shared CI machine: 25 ms still carries 200 such trials."""
    ledger = Ledger(cap_usd=100.0, sweep_id=_sweep(), store_url=store_url)
    for k in range(20):
        assert ledger.reserve(f"t{k}", 1.0)
    n = 200
    t0 = time.perf_counter()
    for k in range(n):
        ledger.update(f"t{k % 20}", k * 1e-4)
    per_call_s = (time.perf_counter() - t0) / n
    assert per_call_s < 0.025, f"{per_call_s * 1000:.1f} ms per heartbeat"
    assert len(Store(store_url).spend_history(ledger.sweep_id)) == n
    ledger.close()


# --- a write that fails leaves memory unchanged -----------------------------------------------
REFUSE = {
    "sqlite": [
        "CREATE TRIGGER refuse_{t}_{op} BEFORE {op} ON {t} "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION lorasweep_refuse() RETURNS trigger AS "
        "$$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_{op} BEFORE {op} ON {t} FOR EACH ROW "
        "WHEN (NEW.sweep_id = '{sweep}') EXECUTE FUNCTION lorasweep_refuse()",
    ],
}


def _refuse_writes(url: str, sweep: str) -> None:
    """Make the database itself refuse every write of ``sweep``'s rows (triggers: chmod does not
    stop a root-owned test process, a trigger stops everyone)."""
    backend = make_url(url).get_backend_name()
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        for table in ("lorasweep_accounts", "lorasweep_spend", "lorasweep_sweeps"):
            for op in ("INSERT", "UPDATE"):
                for ddl in REFUSE[backend]:
                    conn.exec_driver_sql(ddl.format(t=table, op=op, sweep=sweep))
    engine.dispose()


def _drop_refusals(url: str) -> None:
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        for table in ("lorasweep_accounts", "lorasweep_spend", "lorasweep_sweeps"):
            for op in ("INSERT", "UPDATE"):
                if engine.dialect.name == "sqlite":
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS refuse_{table}_{op}")
                else:
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS refuse_{op} ON {table}")
    engine.dispose()


MUTATIONS = [
    ("reserve", ("new", 0.5)),
    ("resize", ("a", 0.2)),
    ("resize", ("a", 2.0)),
    ("request", ("a", 2.0)),
    ("update", ("a", 0.7)),
    ("settle", ("a", 0.9)),
    ("charge", ("baseline", 0.1)),
    ("mark_started", ("a", 5.0)),
    ("revoke", ("a",)),
    ("set_allowance", (0.3,)),
    ("settle_open", ("ceiling",)),
]


def test_a_failed_write_leaves_the_ledger_unchanged(store_url):
    """Every mutating call writes SQL first: when the database refuses the write, the call raises
    StoreError and the ledger's memory is what it was."""
    sweep = _sweep()
    ledger = Ledger(cap_usd=5.0, sweep_id=sweep, store_url=store_url, allowance_usd=0.1)
    assert ledger.reserve("a", 1.0) and ledger.reserve("b", 1.0)
    ledger.update("a", 0.4)
    before = state(ledger)
    _refuse_writes(store_url, sweep)
    try:
        for method, args in MUTATIONS:
            with pytest.raises(StoreError, match="refused"):
                getattr(ledger, method)(*args)
            assert state(ledger) == before, method
    finally:
        _drop_refusals(store_url)
    ledger.update("a", 0.7)  # the database writes again: so does the ledger
    assert ledger.trials["a"].spent_usd == 0.7
    ledger.close()


def _writes_read_only_files(tmp_path: Path) -> bool:
    """Whether this process may write a file it made read-only (root: CAP_DAC_OVERRIDE)."""
    probe = tmp_path / "probe"
    probe.write_text("")
    probe.chmod(0o444)
    try:
        probe.open("a").close()
        return True
    except PermissionError:
        return False
    finally:
        probe.unlink()


def test_a_read_only_sqlite_file_leaves_the_ledger_unchanged(tmp_path):
    """The ledger's file made read-only under it (chmod): the next write fails after its
    retries, names the cause, and the ledger's memory is what it was. (The database-refused
    writes above cover every call wherever this one has to skip.)"""
    if _writes_read_only_files(tmp_path):
        pytest.skip("this process writes read-only files (root with CAP_DAC_OVERRIDE)")
    path = tmp_path / "ledger.db"
    ledger = Ledger(cap_usd=5.0, sweep_id=_sweep(), store_url=f"sqlite:///{path}")
    assert ledger.reserve("a", 1.0)
    before = state(ledger)
    ledger.close()  # open connections keep writing; the next one opens the file read-only
    modes = {p: p.stat().st_mode for p in tmp_path.iterdir()}
    try:
        for p in [*modes, tmp_path]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        with pytest.raises(StoreError, match="ledger store: write of a failed"):
            ledger.update("a", 0.5)
        assert state(ledger) == before
    finally:
        tmp_path.chmod(0o755)
        for p, mode in modes.items():
            p.chmod(mode)


def _hold_write_lock(url: str):
    """Another connection holding the write lock of the ledger's tables until closed."""
    engine = sqlalchemy.create_engine(url)
    conn = engine.connect()
    if engine.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        conn.begin()
        conn.exec_driver_sql("LOCK TABLE lorasweep_accounts IN ACCESS EXCLUSIVE MODE")
    return engine, conn


def test_a_locked_store_is_retried_then_named_in_one_line(store_url):
    """A lock that outlasts the retries: StoreError naming the cause and the URL, memory
    unchanged; once the lock is gone the same call goes through."""
    short = (
        _with_query(store_url, timeout="0.05")
        if store_url.startswith("sqlite")
        else _with_query(store_url, options="-c lock_timeout=50")
    )
    ledger = Ledger(cap_usd=5.0, sweep_id=_sweep(), store_url=short)
    assert ledger.reserve("a", 1.0)
    before = state(ledger)
    engine, conn = _hold_write_lock(store_url)
    t0 = time.monotonic()
    try:
        with pytest.raises(StoreError) as err:
            ledger.update("a", 0.5)
    finally:
        conn.close()
        engine.dispose()
    elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "\n" not in message and "after 5 tries" in message
    assert ("database is locked" in message) or ("lock" in message.lower())
    assert make_url(short).render_as_string(hide_password=True) in message
    assert 0.05 + 0.1 + 0.2 + 0.4 <= elapsed < 10
    assert state(ledger) == before
    ledger.update("a", 0.5)
    assert ledger.trials["a"].spent_usd == 0.5
    ledger.close()


def test_a_dropped_postgres_connection_is_retried():
    """The server ends the ledger's connection (a restart, a failover): the next call reconnects
    and goes through."""
    app = f"ledger-{uuid.uuid4().hex[:8]}"
    url = _with_query(require_pg(), application_name=app)
    ledger = Ledger(cap_usd=5.0, sweep_id=_sweep(), store_url=url)
    assert ledger.reserve("a", 1.0)
    admin = sqlalchemy.create_engine(PG_URL)
    with admin.begin() as conn:
        killed = conn.exec_driver_sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE application_name = '{app}'"
        ).scalar()
    admin.dispose()
    assert killed >= 1
    ledger.update("a", 0.5)
    assert Ledger(cap_usd=5.0, sweep_id=ledger.sweep_id, store_url=url).trials["a"].spent_usd == 0.5
    ledger.close()


def test_a_password_never_shows_in_store_errors():
    """PostgreSQL trusts this machine, so a URL with a password still connects: a write that
    fails there must name the URL with the password hidden."""
    secret = "s3cr3t-pw"
    url = make_url(require_pg()).set(password=secret)
    url = _with_query(url.render_as_string(hide_password=False), options="-c lock_timeout=50")
    ledger = Ledger(cap_usd=5.0, sweep_id=_sweep(), store_url=url)
    assert ledger.reserve("a", 1.0)
    engine, conn = _hold_write_lock(PG_URL)
    try:
        with pytest.raises(StoreError) as err:
            ledger.update("a", 0.5)
    finally:
        conn.close()
        engine.dispose()
    assert secret not in str(err.value) and "***" in str(err.value)
    ledger.close()
    for bad in (
        f"postgresql://u:{secret}@127.0.0.1:1/none",
        f"postgresql://u:{secret}@/x?host=/no",
    ):
        with pytest.raises(StoreError) as err:
            Store(bad)
        assert secret not in str(err.value) and "storage.service_db" in str(err.value)
        assert "\n" not in str(err.value)


# --- sqlite under several writers ------------------------------------------------------------
def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    path = tmp_path / "ledger.db"
    store = Store(f"sqlite:///{path}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


WRITER = """
import json, sys
from orchestrator.budget import Ledger
url, sweep, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ledger = Ledger(100.0, sweep_id=sweep, store_url=url)
for i in range(n):
    tid = f"t{i % 7}"
    if tid not in ledger.trials:
        ledger.reserve(tid, 1.0)
    ledger.update(tid, ledger.trials[tid].spent_usd + 0.001)
    if i % 11 == 10:
        ledger.request(tid, ledger.trials[tid].ceiling_usd + 0.01)
print(json.dumps(ledger.snapshot()))
"""


def test_several_processes_write_one_sqlite_ledger(tmp_path):
    """Four processes start at once on a new sqlite file (table creation, WAL switch) and write
    their own sweeps as fast as they can: no "database is locked" escapes, nothing is lost."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    sweeps = [f"w{k}" for k in range(4)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, s, "150"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(),
            cwd=ROOT,
            text=True,
        )
        for s in sweeps
    ]
    outs = [c.communicate(timeout=240) for c in children]
    for child, (_, err) in zip(children, outs, strict=True):
        assert child.returncode == 0 and "locked" not in err, err
    store = Store(url)
    for s, (out, _) in zip(sweeps, outs, strict=True):
        snap = json.loads(out)
        assert snap["spent_usd"] == pytest.approx(0.15)
        assert store.totals(s).spent_usd == pytest.approx(snap["spent_usd"])
        assert len(store.spend_history(s)) == 150
    store.close()


# --- schema of an older database --------------------------------------------------------------
OLD_ACCOUNTS = """CREATE TABLE lorasweep_accounts (
    sweep_id VARCHAR(200) NOT NULL REFERENCES lorasweep_sweeps (sweep_id),
    key VARCHAR(200) NOT NULL, ceiling_usd FLOAT NOT NULL, spent_usd FLOAT NOT NULL,
    predicted_usd FLOAT, settled BOOLEAN NOT NULL, updated_unix FLOAT NOT NULL,
    PRIMARY KEY (sweep_id, key))"""
OLD_SWEEPS = """CREATE TABLE lorasweep_sweeps (sweep_id VARCHAR(200) NOT NULL PRIMARY KEY,
    name VARCHAR(200) NOT NULL, cap_usd FLOAT NOT NULL, created_unix FLOAT NOT NULL)"""


def test_a_database_of_the_previous_schema_gains_the_new_columns(tmp_path):
    """Tables made by the previous release (no revoked column): opening adds the columns, the
    old rows load, and a revoke persists."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute(OLD_SWEEPS)
    db.execute(OLD_ACCOUNTS)
    db.execute("INSERT INTO lorasweep_sweeps VALUES ('old', 'old', 2.0, 1.0)")
    db.execute("INSERT INTO lorasweep_accounts VALUES ('old', 'a', 1.0, 0.25, NULL, 0, 1.0)")
    db.commit()
    db.close()
    ledger = Ledger(cap_usd=9.0, sweep_id="old", store_url=url)
    accounts = ledger.open_accounts()
    assert accounts["a"].pop("reported_s_ago") >= 0.0
    assert ledger.cap_usd == 2.0 and accounts == {
        "a": {"ceiling_usd": 1.0, "spent_usd": 0.25, "revoked": False}
    }
    ledger.revoke("a")
    ledger.close()
    again = Ledger(cap_usd=9.0, sweep_id="old", store_url=url)
    assert again.revoked("a") and not again.request("a", 1.5)
    again.close()


# --- errors and CI --------------------------------------------------------------------------
def test_unknown_sweep_and_bad_url(store_url):
    store = Store(store_url)
    with pytest.raises(LorasweepError, match="no ledger"):
        store.totals("nope-" + uuid.uuid4().hex)
    store.close()
    with pytest.raises(StoreError, match="storage.service_db"):
        Store("postgresql://nobody@127.0.0.1:1/none")


def _pytest(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**_child_env(), **env},
        timeout=120,
    )


def test_postgres_tests_fail_in_ci_when_postgres_is_unreachable():
    """CI=true: an unreachable PostgreSQL fails the PostgreSQL params; elsewhere they skip."""
    dead = "postgresql://postgres@127.0.0.1:1/test"
    select = ["tests/test_store.py::test_unknown_sweep_and_bad_url[postgresql]"]
    in_ci = _pytest(select, CI="true", LORASWEEP_TEST_PG_URL=dead)
    assert in_ci.returncode == 1 and "skipped" not in in_ci.stdout, in_ci.stdout
    assert "CI=true: PostgreSQL not reachable" in in_ci.stdout
    local = _pytest(select, CI="", LORASWEEP_TEST_PG_URL=dead)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout


def test_ensure_postgres_fails_in_ci_without_postgres(tmp_path):
    """scripts/ensure-postgres.sh on a machine without PostgreSQL: exit 1 with a clear message
    under CI=true, exit 0 (the tests skip) elsewhere."""
    bin_dir = tmp_path / "bin"  # a PATH with a shell and coreutils but no PostgreSQL
    bin_dir.mkdir()
    for tool in ("bash", "ls", "head", "seq", "sleep", "cat", "dirname", "env"):
        for d in ("/usr/bin", "/bin"):
            if Path(d, tool).exists():
                (bin_dir / tool).symlink_to(Path(d, tool))
                break
    script = str(ROOT / "scripts" / "ensure-postgres.sh")
    env = {"PATH": str(bin_dir)}
    ci = subprocess.run(["bash", script], env={**env, "CI": "true"}, capture_output=True, text=True)
    assert ci.returncode == 1 and "CI=true" in ci.stderr and "PostgreSQL" in ci.stderr
    local = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert local.returncode == 0 and "will skip" in local.stderr


def test_of_two_drivers_claiming_a_sweep_one_wins(store_url):
    """Two ``lorasweep resume`` of one sweep at once: the first claim wins, the second is
    refused while the winner's heartbeat is fresh, and a stale heartbeat frees the sweep."""
    store = Store(store_url)
    sweep = _sweep()
    store.open_sweep(sweep, "demo", 1.0)
    store.set_sweep(sweep, state="interrupted", driver_heartbeat_unix=100.0)
    assert store.claim_driver(sweep, stale_s=30, now_unix=1000.0)
    assert not store.claim_driver(sweep, stale_s=30, now_unix=1010.0)
    row = store.sweep(sweep)
    assert row.state == "running" and row.driver_heartbeat_unix == 1000.0
    assert store.claim_driver(sweep, stale_s=30, now_unix=1031.0)  # the winner died
    assert not store.claim_driver("no-such-sweep", stale_s=30)
