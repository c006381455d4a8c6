"""``lorasweep resume`` of a packed sweep (``resources.pack_slots`` > 1): refused, before any spend.

A packed slot keeps no checkpoint it could go on from: its Tune checkpoint holds its adapter
(``pack_trial._Slot.close``), not its optimizer's state, its step and its data order, so a
restored trial would fail at once (``run_packed_trial`` refuses ``resume_from``) or, with no
checkpoint yet, train again from step 0 under the same trial id and MLflow run. Until slots
resume on a new pack host, a packed sweep whose driver died after its trials began is not run
again: :func:`refuse` settles every account the dead driver left open (as ``lorasweep abandon``
prices them: its last heartbeat plus the time until the crash), closes its MLflow runs (the
trials' as ``interrupted`` with their cost, the parent's as ``interrupted``), leaves the sweep
``interrupted`` and raises, naming the sweep and ``lorasweep abandon``. A packed sweep that died
before any trial had an account (in its base-model eval) resumes as any sweep does.
"""

from __future__ import annotations

from orchestrator.errors import LorasweepError

REASON = "resume refused: packed trials cannot resume from their checkpoints yet"


def refuse(spec, store, sweep_id: str, tracking_uri: str, service_db: str) -> None:
    """Raise :class:`LorasweepError` (after settling and closing, see the module doc) when
    ``sweep_id`` is a packed sweep whose trials had begun; return otherwise (the usual checks
    of ``run_sweep`` follow: no such sweep, still running, finished)."""
    from orchestrator import pack_sweep
    from orchestrator.lifecycle import effective_state

    if pack_sweep.slots(spec) <= 1:
        return
    row = store.sweep(sweep_id)
    if row is None or effective_state(row) not in ("interrupted", "failed"):
        return
    trials = [a for a in store.accounts(sweep_id) if not a.charge]
    if not trials:
        return
    from orchestrator.abandon import settle_and_close

    snap = settle_and_close(store, row, service_db, tracking_uri, "interrupted", REASON)
    raise LorasweepError(
        f"SWEEP: {sweep_id} ran packed trials (resources.pack_slots: {pack_sweep.slots(spec)}), "
        "and a packed sweep cannot resume yet: its slots keep no optimizer checkpoint to go on "
        f"from. Nothing was run; its accounts are settled (spent ${snap['spent_usd']:.5f} of "
        f"${snap['cap_usd']:g}) and its MLflow runs closed. Give it up with lorasweep abandon "
        f"{sweep_id} and start a new sweep (pack_slots: 1 sweeps resume)"
    )
