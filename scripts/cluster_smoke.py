"""The Python half of ``scripts/cluster-smoke.sh``: what is easier to say with the libraries than
in shell. The shell script starts and stops the processes; this builds the inputs and checks
what the run left on the servers. Every check reads a server (the Ray dashboard's state API,
the MLflow server, the PostgreSQL ledger, the lorasweep API), never a file of the driver.

    python scripts/cluster_smoke.py createdb BASE_URL NAME...      # PostgreSQL databases
    python scripts/cluster_smoke.py inputs WORK                      # tiny model + data files
    LORASWEEP_TOKEN=... python scripts/cluster_smoke.py check --sweep ID ...  # the checks

``check`` prints ``nodes=2 trials=N on_worker=M spent=$X cap=$Y`` on success; on a failed check
it prints the reason on one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEND_TOLERANCE_USD = 1e-6  # the ledger's and MLflow's floats of the same seconds x price


class SmokeFailure(Exception):
    """One check failed: its message is the smoke's reason."""


def createdb(base_url: str, names: list[str]) -> None:
    """Create each database of ``names`` on the PostgreSQL server at ``base_url`` if missing."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(
        f"{base_url.rstrip('/')}/postgres", isolation_level="AUTOCOMMIT"
    )
    try:
        with engine.connect() as conn:
            have = {r[0] for r in conn.exec_driver_sql("SELECT datname FROM pg_database")}
            for name in names:
                if name not in have:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                    print(f"created database {name}")
    finally:
        engine.dispose()


def inputs(work: Path) -> None:
    """The tiny random-init Llama (a tokenizer trained in code) and the demo task's files: no
    model hub is needed. Prints their paths as JSON."""
    from workers.synthetic import build_demo_inputs

    model, data = build_demo_inputs(work)
    print(json.dumps({"model": str(model), "data": {k: str(v) for k, v in data.items()}}))


def _nodes(dashboard_url: str) -> tuple[list, str]:
    """The cluster's alive nodes and the worker node's id (the one that is not the head)."""
    from ray.util.state import list_nodes

    alive = [n for n in list_nodes(address=dashboard_url) if n.state == "ALIVE"]
    workers = [n.node_id for n in alive if not n.is_head_node]
    if len(alive) != 2 or len(workers) != 1:
        raise SmokeFailure(f"the cluster has {len(alive)} alive node(s), not a head and a worker")
    return alive, workers[0]


def check(args) -> str:
    import httpx
    from mlflow.tracking import MlflowClient

    from orchestrator.store import Store

    alive, worker_id = _nodes(args.dashboard)
    headers = {"Authorization": f"Bearer {os.environ['LORASWEEP_TOKEN']}"}
    status = httpx.get(f"{args.api}/v1/sweeps/{args.sweep}", headers=headers, timeout=30).json()
    if status.get("state") != "completed":
        raise SmokeFailure(
            f"sweep {args.sweep} ended {status.get('state')}: {status.get('end_reason')}"
        )

    # the MLflow server holds the sweep's parent run and its child runs, tagged with their node
    client = MlflowClient(args.mlflow)
    mlflow = status["mlflow"]
    if not mlflow.get("tracking_uri", "").startswith(args.mlflow):
        raise SmokeFailure(f"the sweep tracked to {mlflow.get('tracking_uri')}, not {args.mlflow}")
    parent = client.get_run(mlflow["parent_run_id"])
    children = client.search_runs(
        [mlflow["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    ran = [c for c in children if "score" in c.data.metrics]  # trials that evaluated
    if not ran:
        raise SmokeFailure(f"no child run of {args.sweep} on the MLflow server has a score")
    untagged = [c.info.run_name for c in ran if not c.data.tags.get("lorasweep.ray_node_id")]
    if untagged:
        raise SmokeFailure(f"child runs without lorasweep.ray_node_id: {untagged}")
    nodes = {n.node_id for n in alive}
    strangers = [c.data.tags["lorasweep.ray_node_id"] for c in ran]
    if not set(strangers) <= nodes:
        raise SmokeFailure(f"child runs name nodes not in the cluster: {set(strangers) - nodes}")
    on_worker = sum(1 for c in ran if c.data.tags["lorasweep.ray_node_id"] == worker_id)
    if on_worker < 1:
        raise SmokeFailure(f"no trial ran on the worker node {worker_id[:12]}")

    # metrics: each evaluated trial's curve; adapters: artifacts proxied by the server
    for c in ran:
        if not client.get_metric_history(c.info.run_id, "eval_loss"):
            raise SmokeFailure(f"child run {c.info.run_name} has no eval_loss history")
    with_adapter = [c for c in ran if client.list_artifacts(c.info.run_id, "adapter")]
    if not with_adapter:
        raise SmokeFailure("no child run has an adapter artifact on the MLflow server")
    bad_store = [
        c.info.artifact_uri
        for c in with_adapter
        if not c.info.artifact_uri.startswith("mlflow-artifacts:")
    ]
    if bad_store:
        raise SmokeFailure(f"adapters not in the server's proxied artifact store: {bad_store[0]}")

    # the promoted model: models:/NAME@champion resolves to the version promote registered
    promoted = json.loads(args.promoted)
    version = client.get_model_version_by_alias(promoted["model"], "champion")
    if str(version.version) != str(promoted["version"]):
        raise SmokeFailure(
            f"{promoted['model']}@champion is version {version.version}, "
            f"promote said {promoted['version']}"
        )

    # money: the ledger (PostgreSQL), the API and MLflow agree on what the sweep spent
    store = Store(args.service_db)
    try:
        accounts = {a.key: a for a in store.accounts(args.sweep)}
        open_accounts = [k for k, a in accounts.items() if not a.settled]
        ledger_usd = sum(a.spent_usd for a in accounts.values())
    finally:
        store.close()
    if open_accounts:
        raise SmokeFailure(f"ledger accounts left open: {open_accounts}")
    if abs(ledger_usd - status["spent_usd"]) > SPEND_TOLERANCE_USD:
        raise SmokeFailure(
            f"ledger spent ${ledger_usd:.6f}, the API says ${status['spent_usd']:.6f}"
        )
    mlflow_usd = parent.data.metrics.get("spent_usd")
    if mlflow_usd is None or abs(mlflow_usd - ledger_usd) > SPEND_TOLERANCE_USD:
        raise SmokeFailure(
            f"ledger spent ${ledger_usd:.6f}, the MLflow parent run says ${mlflow_usd}"
        )
    for c in children:  # each trial's bill: its child run's cost_usd is its ledger account
        key = c.data.tags.get("lorasweep.trial_id")
        usd = c.data.metrics.get("cost_usd")
        if (
            key in accounts
            and usd is not None
            and abs(accounts[key].spent_usd - usd) > SPEND_TOLERANCE_USD
        ):
            raise SmokeFailure(
                f"trial {key}: ledger ${accounts[key].spent_usd:.6f}, MLflow ${usd:.6f}"
            )
    cap = float(status["budget_usd"])
    if ledger_usd > cap:
        raise SmokeFailure(f"spent ${ledger_usd:.6f} over the cap ${cap:g}")
    return (
        f"nodes={len(alive)} trials={len(ran)} on_worker={on_worker} "
        f"spent=${ledger_usd:.4f} cap=${cap:g}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("createdb")
    c.add_argument("base_url")
    c.add_argument("names", nargs="+")
    i = sub.add_parser("inputs")
    i.add_argument("work", type=Path)
    k = sub.add_parser("check")
    for opt in ("--sweep", "--api", "--dashboard", "--mlflow", "--service-db", "--promoted"):
        k.add_argument(opt, required=True)
    args = ap.parse_args()
    if args.cmd == "createdb":
        createdb(args.base_url, args.names)
    elif args.cmd == "inputs":
        inputs(args.work)
    else:
        try:
            print(check(args))
        except SmokeFailure as exc:
            print(" ".join(str(exc).split()))
            sys.exit(1)


if __name__ == "__main__":
    main()
