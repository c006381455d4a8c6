"""``lorasweep serve --ray-address http://HEAD:8265``: each sweep is a Ray Job on a real cluster
(``ray start --head --include-dashboard=true``, token auth on, ``tests/local_cluster.py``),
submitted through ``JobSubmissionClient``, its state read from the job, reattached after the API
is SIGKILLed and started again, and cancelled by stopping the job (the driver gets SIGINT, closes
its trials and settles). The service's database is PostgreSQL (the job's driver on the cluster
writes its ledger there); the tiny random-init Llama stands in for a real model.
"""

from __future__ import annotations

import time

import httpx
import pytest
from local_cluster import LocalRayCluster
from service_server import create_token, service_db, start_server
from sqlalchemy.engine import make_url
from test_service_runs import _spec, _submit, _wait, _wait_state

from orchestrator.store import Store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SERVER_ENV = {"LORASWEEP_RUNNER_POLL_S": "0.5"}


def _job_id(db_url: str, sweep_id: str) -> tuple[str | None, int]:
    from orchestrator.service.db import ServiceSweep, make_engine, session_scope

    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            row = s.get(ServiceSweep, sweep_id)
            return row.job_id, row.attempts
    finally:
        engine.dispose()


class _Jobs:
    """The dashboard's job REST API with the cluster's token (what ``JobSubmissionClient``
    calls; this test process imported Ray before it knew the token, and Ray reads its auth mode
    once, at import)."""

    def __init__(self, cluster: LocalRayCluster) -> None:
        self.url = f"{cluster.dashboard_url}/api/jobs/"
        self.headers = {"Authorization": f"Bearer {cluster.token}"}

    def info(self, job_id: str) -> dict:
        resp = httpx.get(self.url + job_id, headers=self.headers, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def status(self, job_id: str) -> str:
        return self.info(job_id)["status"]

    def stop_running(self) -> None:
        for job in httpx.get(self.url, headers=self.headers, timeout=30).json():
            if job["status"] in ("PENDING", "RUNNING"):
                httpx.post(f"{self.url}{job['submission_id']}/stop", headers=self.headers)


def test_sweeps_run_as_ray_jobs_reattach_after_an_api_kill_and_cancel_stops_the_job(
    tmp_path, tiny_model, small_data
):
    t0 = time.monotonic()
    with LocalRayCluster(head_cpus=1) as cluster, service_db("postgresql", tmp_path) as db_url:
        client = _Jobs(cluster)
        assert httpx.get(client.url, timeout=30).status_code == 401  # token auth is on
        token = create_token(db_url, "team-a", quota_usd=50.0, cwd=tmp_path)
        env = {**cluster.env, **SERVER_ENV}
        storage = {"ray_storage": str(tmp_path / "shared" / "ray")}

        def serve():
            return start_server(
                db_url,
                cwd=tmp_path,
                ray_address=cluster.dashboard_url,
                max_running_sweeps=1,
                env=env,
            )

        server = serve()
        try:
            # a cluster sweep without shared storage is refused at submission, naming the field
            bad = httpx.post(
                f"{server.url}/v1/sweeps",
                json={"spec": _spec(tiny_model, small_data, name="noshare")},
                headers=server.auth(token),
                timeout=120,
            )
            assert bad.status_code == 422, bad.text
            assert "storage.ray_storage" in bad.text

            # 1. a sweep runs as a Ray Job; the API is SIGKILLed mid-sweep and reattaches
            spec = _spec(tiny_model, small_data, name="jobs", max_trials=2, storage=storage)
            sweep_id = _submit(server, token, spec)["id"]
            job_id = _wait(lambda: _job_id(db_url, sweep_id)[0], 120, "job id", server)
            assert job_id == f"{sweep_id}-1"
            info = client.info(job_id)
            assert info["status"] in ("PENDING", "RUNNING")
            assert info["metadata"]["lorasweep.sweep_id"] == sweep_id
            job_env = info["runtime_env"]["env_vars"]
            assert job_env["RAY_JOB_STOP_SIGNAL"] == "SIGINT"  # a cancel is the driver's Ctrl-C
            assert (
                make_url(job_env["LORASWEEP_SERVICE_DB"]).password is None
            )  # the dashboard shows it
            _wait_state(server, token, sweep_id, {"running"})
            server.kill()
            server = serve()
            done = _wait_state(server, token, sweep_id, {"completed", "failed"}, timeout_s=360)
            log_path = tmp_path / "lorasweep-data" / "service" / "logs" / f"{sweep_id}.log"
            assert done["state"] == "completed", (done["end_reason"], log_path.read_text()[-3000:])
            assert _job_id(db_url, sweep_id) == (job_id, 1)  # reattached, never relaunched
            assert client.status(job_id) == "SUCCEEDED"
            assert len(done["trials"]) == 2 and done["spent_usd"] > 0
            store = Store(db_url)
            spent = sum(a.spent_usd for a in store.accounts(sweep_id))
            assert done["spent_usd"] == pytest.approx(spent, abs=1e-6)
            log = log_path.read_text()
            assert f"Ray Job {job_id}" in log and "step" in log  # the job's output, copied

            # 2. cancel stops the job: its driver closes the running trial and settles
            long = _spec(
                tiny_model, small_data, name="cancel", max_trials=4, max_steps=60, storage=storage
            )
            cancel_id = _submit(server, token, long)["id"]

            def trial_spending():  # a trial's own account (not the base eval's) has spent
                try:
                    accounts = Store(db_url).accounts(cancel_id)
                except Exception:  # noqa: BLE001 - the ledger's rows are being written
                    return False
                return any(a.key != "baseline" and a.spent_usd > 0 for a in accounts)

            _wait(trial_spending, 240, "a trial of the cancelled sweep spends", server)
            cancel_job = _job_id(db_url, cancel_id)[0]
            resp = httpx.post(
                f"{server.url}/v1/sweeps/{cancel_id}/cancel", headers=server.auth(token)
            )
            assert resp.status_code == 202, resp.text
            gone = _wait_state(server, token, cancel_id, {"cancelled", "failed"}, timeout_s=300)
            assert gone["state"] == "cancelled", gone
            assert client.status(cancel_job) == "STOPPED"
            accounts = Store(db_url).accounts(cancel_id)
            assert accounts and all(a.settled for a in accounts)
            assert gone["reserved_usd"] == pytest.approx(0.0, abs=1e-9)
            assert gone["spent_usd"] > 0  # what it spent stays on record
            assert gone["spent_usd"] <= long["budget_usd"]
        finally:
            server.stop()
            client.stop_running()  # a failed test's jobs (they go with the cluster anyway)
    print(f"\nray jobs test wall time: {time.monotonic() - t0:.0f} s")
