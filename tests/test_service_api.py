"""The sweep service's API against a real ``lorasweep serve`` (uvicorn on loopback, the real
runner started with ``--max-running-sweeps 0`` so submitted sweeps stay queued: the sweeps that
run are ``tests/test_service_runs.py``'s), on sqlite and on PostgreSQL (a fresh database each).

What a user would notice: refused tokens, another tenant's sweep invisible, quota refusals and
their arithmetic, 422s that name the field to fix, cancel of a queued sweep, tokens printed once
and stored hashed, an API process without torch, and no 5xx for any input (schemathesis).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import sqlalchemy
import yaml
from _ledger_db import BACKENDS
from service_server import create_token, run_cli, serve, service_db, start_server

pytestmark = pytest.mark.service

ID_RE = re.compile(r"^[A-Za-z0-9_.-]+-\d{8}-\d{6}-[0-9a-f]{4}$")
TIMEOUT_S = 120.0  # a submission runs the preflight (the first one waits for torch to load)


class Api:
    """One running server, its database and its tenants' tokens."""

    def __init__(self, server, db_url: str, tokens: dict[str, str], cwd: Path, model: Path):
        self.server, self.db_url, self.tokens, self.cwd, self.model = (
            server,
            db_url,
            tokens,
            cwd,
            model,
        )
        self.http = httpx.Client(base_url=server.url, timeout=TIMEOUT_S)

    def h(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[tenant]}"}

    def spec(self, name: str = "tiny", budget_usd: float = 0.02, **extra) -> dict:
        """A small valid spec: the tiny test model, data files given relative to the server's
        working directory (the server resolves them)."""
        return {
            "name": name,
            "budget_usd": budget_usd,
            "model": {"name_or_path": str(self.model)},
            "data": {
                "source": "files",
                "train": "data/train.jsonl",
                "validation": "data/validation.jsonl",
                "test": "data/test.jsonl",
            },
            "search_space": {"preset": "default", "rank": {"choices": [2, 4]}},
            "trial": {
                "max_steps": 6,
                "eval_every": 2,
                "batch_size": 4,
                "max_seq_len": 160,
                "eval_examples": 4,
                "max_new_tokens": 8,
            },
            "resources": {"accelerator": "cpu", "cpus_per_trial": 1},
            "max_trials": 2,
            **extra,
        }

    def submit(self, tenant: str, spec: dict) -> httpx.Response:
        return self.http.post("/v1/sweeps", json={"spec": spec}, headers=self.h(tenant))

    def submit_yaml(self, tenant: str, text: str) -> httpx.Response:
        headers = {**self.h(tenant), "Content-Type": "application/yaml"}
        return self.http.post("/v1/sweeps", content=text.encode(), headers=headers)


@pytest.fixture(scope="module", params=BACKENDS)
def api(request, tmp_path_factory, tiny_model, small_data):
    tmp = tmp_path_factory.mktemp(f"service-{request.param}")
    cwd = tmp / "server"
    (cwd / "data").mkdir(parents=True)
    for split, path in small_data.items():
        shutil.copy(path, cwd / "data" / f"{split}.jsonl")
    with service_db(request.param, tmp) as db_url:
        tokens = {
            "alpha": create_token(db_url, "alpha", cwd=tmp),  # unlimited
            "beta": create_token(db_url, "beta", cwd=tmp),
            "quota": create_token(db_url, "quota", quota_usd=0.05, cwd=tmp),
            "race": create_token(db_url, "race", quota_usd=0.06, cwd=tmp),
            "revoked": create_token(db_url, "gamma", cwd=tmp),
        }
        listed = run_cli(["tokens", "list", "--db", db_url], cwd=tmp)
        gamma_id = re.search(r"(\d+)\s*│\s*gamma", listed.stdout).group(1)
        revoked = run_cli(["tokens", "revoke", gamma_id, "--db", db_url], cwd=tmp)
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        with serve(db_url, cwd=cwd, max_running_sweeps=0) as server:
            client = Api(server, db_url, tokens, cwd, tiny_model)
            yield client
            client.http.close()
            assert "Traceback" not in server.log(), server.log()[-3000:]


# --- auth --------------------------------------------------------------------------------------
def test_requests_without_a_valid_token_get_401(api):
    for headers in (
        {},
        {"Authorization": "Bearer lsw_not-a-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        api.h("revoked"),
    ):
        for method, path in (("GET", "/v1/sweeps"), ("GET", "/v1/tenant"), ("POST", "/v1/sweeps")):
            r = api.http.request(method, path, headers=headers, json={"spec": api.spec()})
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["detail"]["code"] == "unauthorized"
    assert api.http.get("/v1/tenant", headers=api.h("alpha")).status_code == 200


def test_another_tenants_sweep_is_404_with_none_of_its_data(api):
    r = api.submit("alpha", api.spec(name="secret-project"))
    assert r.status_code == 201, r.text
    sweep_id = r.json()["id"]
    for method, path in (
        ("GET", f"/v1/sweeps/{sweep_id}"),
        ("GET", f"/v1/sweeps/{sweep_id}/events"),
        ("POST", f"/v1/sweeps/{sweep_id}/cancel"),
        ("POST", f"/v1/sweeps/{sweep_id}/promote"),
    ):
        theirs = api.http.request(method, path, headers=api.h("beta"))
        nowhere = path.replace(sweep_id, "no-such-sweep-20260101-000000-0000")
        missing = api.http.request(method, nowhere, headers=api.h("beta"))
        assert theirs.status_code == 404, (path, theirs.text)
        # word for word the answer for a sweep that does not exist (the id asked for aside)
        assert theirs.json()["detail"]["code"] == "not_found"
        assert theirs.text.replace(sweep_id, "ID") == missing.text.replace(
            "no-such-sweep-20260101-000000-0000", "ID"
        )
        assert "budget" not in theirs.text
    theirs = api.http.get("/v1/sweeps", headers=api.h("beta")).json()["sweeps"]
    assert sweep_id not in [s["id"] for s in theirs]
    # and the owner still has it, queued
    mine = api.http.get(f"/v1/sweeps/{sweep_id}", headers=api.h("alpha")).json()
    assert mine["state"] == "queued"


# --- submit, list, status ----------------------------------------------------------------------
def test_yaml_submission_is_validated_queued_listed_and_described(api):
    text = yaml.safe_dump(api.spec(name="yaml-sweep", budget_usd=0.03))
    r = api.submit_yaml("alpha", text)
    assert r.status_code == 201, r.text
    out = r.json()
    assert set(out) == {"id", "state", "budget_usd", "predicted_first_rung_usd"}
    assert ID_RE.match(out["id"]) and out["id"].startswith("yaml-sweep-")
    assert out["state"] == "queued" and out["budget_usd"] == 0.03
    assert 0 < out["predicted_first_rung_usd"] < 0.03

    listed = api.http.get("/v1/sweeps", headers=api.h("alpha")).json()["sweeps"]
    assert out["id"] in [s["id"] for s in listed]

    status = api.http.get(f"/v1/sweeps/{out['id']}", headers=api.h("alpha")).json()
    for key in (
        "id", "name", "state", "budget_usd", "spent_usd", "reserved_usd", "remaining_usd",
        "trials", "best", "end_reason", "mlflow",
    ):  # fmt: skip
        assert key in status
    assert status["name"] == "yaml-sweep" and status["state"] == "queued"
    assert (status["spent_usd"], status["reserved_usd"], status["remaining_usd"]) == (0, 0, 0.03)
    assert status["trials"] == [] and status["best"] is None
    assert set(status["mlflow"]) >= {"tracking_uri", "experiment_id", "parent_run_id"}
    assert status["experiment"] == "alpha/yaml-sweep"
    # the data paths were resolved on the server: the stored spec has them absolute
    with sqlalchemy.create_engine(api.db_url).connect() as conn:
        spec_yaml = conn.execute(
            sqlalchemy.text("SELECT spec_yaml FROM service_sweeps WHERE id = :i"), {"i": out["id"]}
        ).scalar_one()
    assert yaml.safe_load(spec_yaml)["data"]["train"] == str(api.cwd / "data" / "train.jsonl")


def test_status_reads_the_leaderboard_and_the_runs_from_mlflow(api):
    """A sweep whose driver logged to MLflow (written here with MlflowClient, as the driver's
    Tracker writes it): its trials best first, the best one, the experiment and parent run."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import KIND_TAG, PARENT_TAG, STATUS_TAG, SWEEP_TAG

    sweep_id = api.submit("beta", api.spec(name="tracked")).json()["id"]
    uri = f"sqlite:///{api.cwd / 'lorasweep-data' / 'mlflow.db'}"  # the spec's default store
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("beta/tracked")
    parent = client.create_run(
        exp_id, tags={KIND_TAG: "sweep", SWEEP_TAG: sweep_id, STATUS_TAG: "completed"}
    )
    for i, (rank, score, cost, status) in enumerate(
        [(2, 0.31, 0.004, "completed"), (4, 0.52, 0.006, "completed"), (4, None, 0.001, "pruned")]
    ):
        run = client.create_run(
            exp_id,
            run_name=f"trial-{i}",
            tags={PARENT_TAG: parent.info.run_id, KIND_TAG: "trial", STATUS_TAG: status},
        )
        for k, v in {"method": "lora", "rank": rank, "learning_rate": 0.003}.items():
            client.log_param(run.info.run_id, k, v)
        client.log_metric(run.info.run_id, "cost_usd", cost)
        if score is not None:
            client.log_metric(run.info.run_id, "score", score)
    # the runner records the sweep's end in the service's table
    engine = sqlalchemy.create_engine(api.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sqlalchemy.text("UPDATE service_sweeps SET state = 'completed' WHERE id = :i"),
                {"i": sweep_id},
            )
    finally:
        engine.dispose()

    status = api.http.get(f"/v1/sweeps/{sweep_id}", headers=api.h("beta")).json()
    assert status["state"] == "completed"
    assert [t["trial"] for t in status["trials"]] == ["trial-1", "trial-0", "trial-2"]
    assert status["best"]["trial"] == "trial-1" and status["best"]["score"] == 0.52
    assert status["trials"][0]["rank"] == 4 and status["trials"][2]["status"] == "pruned"
    assert status["mlflow"] == {
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "parent_run_id": parent.info.run_id,
    }
    maps = api.server.mapped_libraries()  # reading MLflow did not pull torch in either
    assert "libtorch" not in maps and "/torch/" not in maps


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"trial": {"max_step": 3}}, "trial.max_step"),  # a misspelt key
        ({"budget_usd": "lots"}, "budget_usd"),
        ({"budget_usd": 1e-9}, "budget_usd"),  # cannot pay for the first rung (the preflight)
        ({"data": {"source": "files", "train": "data/train.jsonl"}}, "data"),  # no validation
        (
            {
                "data": {
                    "source": "files",
                    "train": "data/missing.jsonl",
                    "validation": "data/validation.jsonl",
                }
            },
            "data.train",
        ),
        ({"storage": {"service_db": "sqlite:///elsewhere.db"}}, "storage.service_db"),
        ({"search_space": {"rank": {"choices": [0]}}}, "search_space.rank"),
    ],
)
def test_a_bad_spec_gets_422_naming_the_field(api, body, field):
    spec = api.spec() | body
    for r in (api.submit("alpha", spec), api.submit_yaml("alpha", yaml.safe_dump(spec))):
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail["field"] == field, detail
        assert detail["code"] == "invalid_spec" and detail["message"]


def test_malformed_bodies_get_422_or_415_not_500(api):
    cases = [
        (b"{not json", "application/json", 422, "body"),
        (json.dumps({"spek": {}}).encode(), "application/json", 422, "spec"),
        (json.dumps({"spec": [1, 2]}).encode(), "application/json", 422, "spec"),
        (b"name: [unclosed", "application/yaml", 422, "spec"),
        (b"name: a\nname: b\nbudget_usd: 1\n", "application/yaml", 422, "name"),
        (b"- just\n- a list\n", "application/yaml", 422, "spec"),
        (b"\xff\xfe", "application/yaml", 422, "spec"),
        (b"name=x", "text/plain", 415, None),
    ]
    for content, kind, status, field in cases:
        r = api.http.post(
            "/v1/sweeps", content=content, headers={**api.h("alpha"), "Content-Type": kind}
        )
        assert r.status_code == status, (content, r.text)
        if field:
            assert r.json()["detail"]["field"] == field, (content, r.text)


# --- quota -------------------------------------------------------------------------------------
def _usage(api, tenant: str) -> dict:
    r = api.http.get("/v1/tenant", headers=api.h(tenant))
    assert r.status_code == 200, r.text
    return r.json()


def test_quota_admits_up_to_the_cent_and_refuses_past_it(api):
    from orchestrator.store import Store

    tenant = "quota"  # quota $0.05/month
    assert _usage(api, tenant) == {
        "tenant": "quota",
        "quota_usd": 0.05,
        "spent_usd_this_month": 0.0,
        "committed_usd": 0.0,
    }
    first = api.submit(tenant, api.spec(name="q1", budget_usd=0.02)).json()["id"]
    assert api.submit(tenant, api.spec(name="q2", budget_usd=0.02)).status_code == 201
    assert _usage(api, tenant)["committed_usd"] == pytest.approx(0.04)

    # $0.04 committed + $0.02 > $0.05: refused, with the numbers
    r = api.submit(tenant, api.spec(name="q3", budget_usd=0.02))
    assert r.status_code == 403, r.text
    detail = r.json()["detail"]
    assert detail["code"] == "quota_exceeded" and detail["field"] == "budget_usd"
    assert detail["quota_usd"] == 0.05 and detail["committed_usd"] == pytest.approx(0.04)
    assert detail["room_usd"] == pytest.approx(0.01)

    # spend recorded by the ledger (as a driver records it) moves from committed to spent
    store = Store(api.db_url)
    try:
        store.open_sweep(first, "q1", 0.02)
        store.save_account(
            first,
            "trial-0",
            ceiling_usd=0.01,
            spent_usd=0.004,
            predicted_usd=0.01,
            settled=True,
            revoked=False,
            started_unix=None,
            charge=False,
        )
    finally:
        store.close()
    u = _usage(api, tenant)
    assert u["spent_usd_this_month"] == pytest.approx(0.004)
    assert u["committed_usd"] == pytest.approx(0.036)  # (0.02 - 0.004) + 0.02
    status = api.http.get(f"/v1/sweeps/{first}", headers=api.h(tenant)).json()
    assert status["spent_usd"] == pytest.approx(0.004)
    assert status["remaining_usd"] == pytest.approx(0.016)

    # exactly the room left ($0.05 - 0.004 - 0.036 = 0.01) is admitted; a cent more is not
    assert api.submit(tenant, api.spec(name="q4", budget_usd=0.0101)).status_code == 403
    assert api.submit(tenant, api.spec(name="q5", budget_usd=0.01)).status_code == 201
    u = _usage(api, tenant)
    assert u["committed_usd"] + u["spent_usd_this_month"] == pytest.approx(0.05)

    # a cancelled sweep commits nothing any more; its spend stays this month's
    assert api.http.post(f"/v1/sweeps/{first}/cancel", headers=api.h(tenant)).status_code == 202
    u = _usage(api, tenant)
    assert u["spent_usd_this_month"] == pytest.approx(0.004)
    assert u["committed_usd"] == pytest.approx(0.03)


def test_concurrent_submissions_cannot_overrun_the_quota(api):
    """Eight submissions at once of $0.02 against a $0.06 quota: exactly three admitted."""
    results: list[int] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        with httpx.Client(base_url=api.server.url, timeout=TIMEOUT_S) as http:
            r = http.post(
                "/v1/sweeps",
                json={"spec": api.spec(name=f"race{i}", budget_usd=0.02)},
                headers=api.h("race"),
            )
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201] * 3 + [403] * 5, results
    assert _usage(api, "race")["committed_usd"] == pytest.approx(0.06)


# --- cancel, promote, events -------------------------------------------------------------------
def test_cancel_of_a_queued_sweep(api):
    sweep_id = api.submit("beta", api.spec(name="to-cancel")).json()["id"]
    r = api.http.post(f"/v1/sweeps/{sweep_id}/cancel", headers=api.h("beta"))
    assert r.status_code == 202, r.text
    assert r.json() == {"id": sweep_id, "state": "cancelled", "cancel_requested": True}
    status = api.http.get(f"/v1/sweeps/{sweep_id}", headers=api.h("beta")).json()
    assert status["state"] == "cancelled" and status["spent_usd"] == 0
    # again: still cancelled (idempotent); promote: not completed
    assert api.http.post(f"/v1/sweeps/{sweep_id}/cancel", headers=api.h("beta")).status_code == 202
    r = api.http.post(f"/v1/sweeps/{sweep_id}/promote", headers=api.h("beta"))
    assert r.status_code == 409 and r.json()["detail"]["code"] == "not_completed"
    # the events stream of an ended sweep ends (no driver ever printed a line)
    with api.http.stream("GET", f"/v1/sweeps/{sweep_id}/events", headers=api.h("beta")) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        body = "".join(s.iter_text())
    assert "event: progress" not in body


def _sse(body: str) -> list[tuple[int, dict]]:
    """(id, data) of each ``progress`` event of a Server-Sent Events body."""
    out = []
    for block in body.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if fields.get("event") == "progress":
            out.append((int(fields["id"]), json.loads(fields["data"])))
    return out


def test_events_stream_the_drivers_lines_live_resume_after_last_event_id_and_end(api):
    sweep_id = api.submit("beta", api.spec(name="events")).json()["id"]
    # the driver's log, where the runner reads progress lines (a sweep that ran would write it)
    log = api.cwd / "lorasweep-data" / "service" / "logs" / f"{sweep_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(
        "sweep started: budget $0.02\n"
        "trial 1 lora r2: score 0.41 at step 2, $0.0011\n"
        "mlflow at postgresql://bob:hunter2@db/mlflow\n"
    )
    url = f"/v1/sweeps/{sweep_id}/events"
    got: list[str] = []

    def follow() -> None:
        with httpx.Client(base_url=api.server.url, timeout=60) as http:
            with http.stream("GET", url, headers=api.h("beta")) as s:
                for chunk in s.iter_text():
                    got.append(chunk)

    reader = threading.Thread(target=follow)
    reader.start()
    _wait_for(lambda: len(_sse("".join(got))) == 3)
    with open(log, "a") as f:  # a line printed while the client watches arrives too
        f.write("trial 2 lora r4: pruned at step 2\n")
    _wait_for(lambda: len(_sse("".join(got))) == 4)
    assert reader.is_alive()  # the sweep is not over: the stream stays open
    api.http.post(f"/v1/sweeps/{sweep_id}/cancel", headers=api.h("beta"))
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream did not end with the sweep"
    events = _sse("".join(got))
    assert [i for i, _ in events] == [1, 2, 3, 4]
    assert events[1][1]["line"] == "trial 1 lora r2: score 0.41 at step 2, $0.0011"
    assert "hunter2" not in "".join(got)

    r = api.http.get(url, headers={**api.h("beta"), "Last-Event-ID": "2"})
    assert [i for i, _ in _sse(r.text)] == [3, 4]
    bad = api.http.get(url, headers={**api.h("beta"), "Last-Event-ID": "two"})
    assert bad.status_code == 422 and bad.json()["detail"]["field"] == "Last-Event-ID"


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_promote_of_a_queued_sweep_is_409(api):
    sweep_id = api.submit("beta", api.spec(name="not-yet")).json()["id"]
    r = api.http.post(f"/v1/sweeps/{sweep_id}/promote", headers=api.h("beta"))
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["state"] == "queued"


# --- tokens, torch, health ---------------------------------------------------------------------
def test_tokens_create_prints_the_token_alone_on_its_last_line_and_stores_only_its_hash(api):
    done = run_cli(["tokens", "create", "--tenant", "delta", "--db", api.db_url], cwd=api.cwd)
    assert done.returncode == 0, done.stderr
    last = done.stdout.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(r"lsw_[A-Za-z0-9_-]{43}", last), done.stdout
    engine = sqlalchemy.create_engine(api.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text("SELECT * FROM service_tokens")).mappings().all()
    finally:
        engine.dispose()
    dump = json.dumps([dict(r) for r in rows], default=str)
    assert last not in dump and last[4:] not in dump
    assert hashlib.sha256(last.encode()).hexdigest() in dump
    # and it works
    r = api.http.get("/v1/tenant", headers={"Authorization": f"Bearer {last}"})
    assert r.json()["tenant"] == "delta"


def test_the_api_process_never_imports_torch(api):
    # submissions ran the preflight (torch, transformers) by now, in worker processes
    assert api.submit("alpha", api.spec(name="no-torch")).status_code == 201
    maps = api.server.mapped_libraries()
    assert "libtorch" not in maps and "/torch/" not in maps


def test_healthz_and_openapi(api):
    assert api.http.get("/healthz").json() == {"status": "ok", "db": "ok"}
    paths = api.http.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/sweeps",
        "/v1/sweeps/{sweep_id}",
        "/v1/sweeps/{sweep_id}/cancel",
        "/v1/sweeps/{sweep_id}/promote",
        "/v1/sweeps/{sweep_id}/events",
        "/v1/tenant",
        "/healthz",
    ):
        assert path in paths


# --- fuzzing -----------------------------------------------------------------------------------
FUZZ_EXAMPLES = 30  # per operation; ~1-2 minutes for all of them on 2 busy cores


def test_fuzzing_from_the_openapi_schema_finds_no_5xx(api):
    """schemathesis generates requests from /openapi.json (valid token): no 5xx, and every
    response matches its documented status, content type and schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{api.server.url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    ran, auth, seen = 0, api.h("beta"), Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for operation, mode in ((op, mode) for op in operations for mode in modes):

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            r = case.call_and_validate(headers=auth, checks=checks, timeout=TIMEOUT_S)
            seen[case.operation.method.upper(), case.operation.path, r.status_code] += 1

        try:
            fuzz()
        except Unsatisfiable:  # nothing to break: an operation without inputs (/healthz)
            assert mode == schemathesis.GenerationMode.NEGATIVE
            continue
        ran += 1
    assert ran >= 13
    print(sorted(seen.items()))
    # the fuzzing reached past auth and validation: some requests were served
    assert any(k[2] in (200, 201, 202) for k in seen), seen


def test_a_database_outage_is_a_503_and_the_service_recovers(tmp_path):
    """PostgreSQL refusing connections (as during a failover): JSON 503s with Retry-After, no
    password in the log; answers again once the database is back, without a restart."""
    from _ledger_db import PG_URL
    from sqlalchemy.engine import make_url

    with service_db("postgresql", tmp_path) as db_url:
        token = create_token(db_url, "ops", cwd=tmp_path)
        name = make_url(db_url).database
        admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        try:
            with serve(db_url, cwd=tmp_path / "server", max_running_sweeps=0) as server:
                http = httpx.Client(base_url=server.url, timeout=30)
                auth = {"Authorization": f"Bearer {token}"}
                assert http.get("/v1/tenant", headers=auth).status_code == 200
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                    conn.exec_driver_sql(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                    )
                for path in ("/v1/tenant", "/v1/sweeps", "/healthz"):
                    r = http.get(path, headers=auth)
                    assert r.status_code == 503, (path, r.text)
                    assert r.json()["detail"]["code"] == "database_unavailable"
                    assert r.headers["retry-after"]
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
                _wait_for(lambda: http.get("/v1/tenant", headers=auth).status_code == 200)
                http.close()
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            admin.dispose()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_preflight_workers_go_with_the_api_process(tmp_path, how):
    """The workers that hold torch for the preflight exit with the API, even when it is
    SIGKILLed (no shutdown runs): nothing is left holding ~400 MB per worker."""
    import signal

    db_url = f"sqlite:///{tmp_path / 'service.db'}"
    server = start_server(db_url, cwd=tmp_path, max_running_sweeps=0)
    try:
        _wait_for(lambda: len(_children(server.pid)) >= 2)  # the warmed preflight workers
        workers = _children(server.pid)
        server.stop(getattr(signal, how))
        _wait_for(lambda: not [p for p in workers if Path(f"/proc/{p}").exists()])
    finally:
        server.stop()
