"""``lorasweep abandon SWEEP``: give up an unfinished sweep without running anything."""

from __future__ import annotations

from orchestrator.errors import LorasweepError


def abandon(service_db: str, tracking_uri: str, sweep_id: str) -> dict:
    """Settle every account the sweep left open at what it spent up to the crash (its last
    heartbeat plus the time until the crash was noticed), close its MLflow runs as KILLED and
    mark it ``cancelled``; returns the ledger's snapshot."""
    from orchestrator.lifecycle import UNFINISHED, effective_state
    from orchestrator.store import Store

    store = Store(service_db)
    row = store.sweep(sweep_id)
    if row is None:
        raise LorasweepError(f"SWEEP: no sweep {sweep_id!r} in --service-db {service_db}")
    state = effective_state(row)
    if state not in UNFINISHED or state == "running":
        raise LorasweepError(
            f"SWEEP: {sweep_id} is {state}; only an interrupted sweep is abandoned"
        )
    return settle_and_close(store, row, service_db, tracking_uri, "cancelled", "abandoned")


def settle_and_close(store, row, service_db: str, tracking_uri: str, state: str, reason: str):
    """Settle every account a dead driver left open at its crash spend, close the sweep's open
    MLflow trial runs as interrupted and its parent as ``state`` with end reason ``reason``,
    and record both on the sweep's row; returns the ledger's snapshot."""
    from orchestrator import leaderboard
    from orchestrator.budget import Ledger
    from orchestrator.lifecycle import crash_settlements
    from orchestrator.tracking import Tracker

    sweep_id = row.sweep_id
    parent = leaderboard.find_sweep(tracking_uri, sweep_id)  # in whichever experiment it is
    price = float(parent.data.params.get("price_usd_per_hour", 0.0))
    ledger = Ledger(row.cap_usd, sweep_id=sweep_id, store_url=service_db, name=row.name)
    try:
        for key, usd in crash_settlements(store, sweep_id, price).items():
            ledger.settle(key, usd)
        snap = ledger.snapshot()
    finally:
        ledger.close()
    # the parent's own experiment: the service names them TENANT/NAME, the CLI the spec's name
    experiment = tracker_experiment_name(tracking_uri, parent.info.experiment_id)
    tracker = Tracker(tracking_uri, experiment)
    tracker.attach_sweep(sweep_id)
    tracker.close_open_trials("interrupted", {a.key: a.spent_usd for a in store.accounts(sweep_id)})
    # the end reason first: the run's description (written by end_sweep) says it
    tracker.client.set_tag(tracker.parent_id, "lorasweep.end_reason", reason)
    tracker.end_sweep(state, {"spent_usd": snap["spent_usd"]}, [])  # cancelled: KILLED
    store.set_sweep(sweep_id, state=state, end_reason=reason)
    return snap


def tracker_experiment_name(tracking_uri: str, experiment_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_experiment(experiment_id).name
