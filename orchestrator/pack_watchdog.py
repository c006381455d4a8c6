"""The watchdog of a packed sweep (``resources.pack_slots`` > 1).

The sweep's watchdog estimates a trial's live spend as the more of (last heartbeat + price x the
time since) and (price x the time since the trial was registered). The second is a floor for a
trial that holds its own GPU: it pays the GPU's price every second, its start-up included. A
packed trial pays only its slot's share of the pack's held seconds (1/K of the price when K
slots step together), so that floor revokes slots well inside their grant (measured on the H200:
four slots revoked at ~11 s, their grant's worth of wall time, before their first eval). Here
the estimate is the since-heartbeat one alone: still an upper bound (a slot is never billed
faster than the GPU's price), so a slot that hangs, or whose heartbeats stop, is still revoked
and then killed within the same margins. And a slot that Tune stopped (ASHA) before it left
the pack leaves when the driver settles it, billed its slot's exact seconds.

A hung pack (a packed step or a slot's closing that never returns, holding the GPU): the slots'
heartbeats stop growing (their bills settle when a step ends), and killing a slot's trial would
leave the host holding the GPU and billing no one (its calls, even those of killed trials, run
on). So every poll also reads the host's live bills (``PackHost.live_bills``, lock-free, in its
own concurrency group): a slot of the GPU call in flight is billed its share of it as it runs, so
K hung slots are not each estimated at the whole GPU's price. When the watchdog kills a slot that
is in a GPU call which does not end (running ``MARGIN_S + GRACE_S``, or still running
``HUNG_WAIT_S`` after the kill was due), or sees a call that long whose slots' trials are all
killed or gone, it stops the host first: each slot's bill read just before the kill, plus its
share of the seconds the kill took, is written to its account (to a ``pack:hung:`` charge for a
slot whose account was settled already), so every second the host held is billed once; the host
is killed, its slots' trials end (``budget_killed`` if the watchdog killed them, else ``failed``,
each with the reason in MLflow: ``reasons``), and the sweep ends in order (``control.ended``: no
later trial waits on a dead pack). Not yet: a new host for the rest of the phase.
"""

from __future__ import annotations

import functools
import time

from orchestrator import remote
from orchestrator.prices import cost_usd
from orchestrator.watchdog import GRACE_S, KILL_LATENCY_S, MARGIN_S, Watchdog

LIVE_TIMEOUT_S = 2.0  # the host's live bills, or this poll goes on without them
HUNG_WAIT_S = 3.0  # a killed slot's GPU call still running this long after the kill: hung
# (what the allowance leaves: allowance_usd covers MARGIN_S + GRACE_S + 2 POLL_S + KILL_LATENCY_S)


class PackWatchdog(Watchdog):
    def __init__(self, ledger, price_usd_per_hour: float, control, host_name: str = "") -> None:
        super().__init__(ledger, price_usd_per_hour, control)
        self.host_name = host_name  # the pack host's Ray actor name
        self._host = None  # its handle, once found
        self._prior_usd: dict[str, float] = {}  # a trial's spend before its slot's bill
        self._live: dict | None = None  # the host's last answer (``PackHost.live_bills``)
        self.stopped_host: str | None = None  # why the host was stopped, once it was
        self.reasons: dict[str, str] = {}  # trial id -> why its pack stopped under it

    def _estimate(self, w, now: float) -> float:
        return w.spent_usd + cost_usd(self.price_usd_per_hour, now - w.seen)

    # --- a hung pack ----------------------------------------------------------------------
    def watch(self, trial_id, kill, spent_usd: float = 0.0) -> None:
        self._prior_usd[trial_id] = spent_usd
        super().watch(trial_id, functools.partial(self._kill_slot, trial_id, kill), spent_usd)

    def _host_handle(self):
        if self._host is None and self.host_name and self.stopped_host is None:
            try:
                import ray

                self._host = ray.get_actor(self.host_name)
            except Exception:  # noqa: BLE001 - not started yet, or the phase is over
                return None
        return self._host

    def _read_live(self) -> dict | None:
        host = self._host_handle()
        if host is None:
            return None
        try:
            import ray

            from orchestrator.pack_host import BILLING_GROUP

            ref = host.live_bills.options(concurrency_group=BILLING_GROUP).remote()
            return ray.get(ref, timeout=LIVE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - gone or not answering: the heartbeats' bound holds
            self._host = None  # looked up again (a later phase's host has the same name)
            return None

    def _slot_usd(self, trial_id: str, billed_s: float) -> float:
        return self._prior_usd.get(trial_id, 0.0) + cost_usd(self.price_usd_per_hour, billed_s)

    def check(self) -> None:
        # while trials are watched, and after, while the host found then lives (a killed
        # trial's call may still run in it: ``_stop_orphaned_call``)
        live = self._read_live() if self.started() or self._host is not None else None
        self._live = live
        if live is not None:  # the slots' live bills: heartbeats the hung step cannot send
            now = time.monotonic()
            with self._lock:
                for trial_id, billed_s in live["bills"].items():
                    w = self._watched.get(trial_id)
                    usd = self._slot_usd(trial_id, billed_s)
                    if w is not None and w.killed_usd is None and usd > w.spent_usd:
                        w.spent_usd, w.seen = usd, now
        super().check()
        self._stop_orphaned_call()

    def _kill_slot(self, trial_id: str, kill) -> None:
        """The base watchdog's kill of a slot's trial: the pack's host first when the slot is
        in a GPU call that does not end (a hung pack; a call just ending is waited for, up to
        ``HUNG_WAIT_S``)."""
        live = self._live
        if live is not None and self.stopped_host is None and trial_id in live["busy"]:
            deadline = time.monotonic() + HUNG_WAIT_S
            while live["busy_s"] < MARGIN_S + GRACE_S and time.monotonic() < deadline:
                time.sleep(0.1)
                fresh = self._read_live()
                if fresh is None or trial_id not in fresh["busy"]:
                    live = None  # the call ended (or the host is gone): not hung
                    break
                live = fresh
            if live is not None:
                self._stop_host(live["busy_s"])
        kill()

    def _stop_orphaned_call(self) -> None:
        """A GPU call still running ``MARGIN_S + GRACE_S`` in, for slots none of which has a
        live trial any more (killed, or ended): no trial will stop it, so the host is stopped
        (the calls a killed trial handed in before it died still run in the host)."""
        live = self._live
        if live is None or self.stopped_host is not None or not live["busy"]:
            return
        if live["busy_s"] < MARGIN_S + GRACE_S:
            return
        with self._lock:
            watched = [self._watched.get(t) for t in live["busy"]]
        if all(w is None or w.killed_usd is not None for w in watched):
            self._stop_host(live["busy_s"])

    def _stop_host(self, busy_s: float) -> None:
        """Kill the hung host, billing every second it held to its slots (see the module doc)."""
        import ray

        host = self._host_handle()
        live = self._read_live() or self._live
        if host is None or live is None:
            return
        why = (
            f"pack hung: a packed GPU call had run {busy_s:.0f} s and did not end once its "
            "slot was past its grant and the watchdog's grace; the watchdog stopped the pack's "
            "host and every trial waiting on it"
        )
        self.stopped_host = why
        t_read = time.monotonic()
        bills = dict(live["bills"])
        for trial_id, billed_s in bills.items():  # before the kill: a slot's trial reads it then
            remote.call(self.ledger.update, trial_id, self._slot_usd(trial_id, billed_s))
        ray.kill(host, no_restart=True)
        deadline = time.monotonic() + KILL_LATENCY_S
        while time.monotonic() < deadline:  # gone when it no longer answers
            try:
                ray.get(host.held_s.remote(), timeout=0.2)
            except ray.exceptions.GetTimeoutError:
                continue
            except Exception:  # noqa: BLE001 - dead
                break
            time.sleep(0.05)
        self._host = None
        # the seconds from the read to the host's end, to the slots of the hung call (or, if
        # it had none, to every slot), equally
        tail = live["busy"] or list(bills)
        tail_s = (time.monotonic() - t_read) / max(1, len(tail))
        for trial_id in tail:
            bills[trial_id] = bills.get(trial_id, 0.0) + tail_s
        final = {t: self._slot_usd(t, billed_s) for t, billed_s in bills.items()}
        with self._lock:
            for trial_id in self._watched:  # every trial of the phase waits on this host
                self.reasons[trial_id] = why
            for trial_id, usd in final.items():
                self.reasons[trial_id] = why
                w = self._watched.get(trial_id)
                if w is not None:  # settled at its bill (the killed slot: at least its estimate)
                    w.killed_usd = max(w.killed_usd or 0.0, usd)
        unsettled_usd = 0.0  # what a slot whose account the driver already settled still owes
        for trial_id, usd in final.items():
            spent_usd = float(remote.call(self.ledger.spent, trial_id, timeout_s=10.0))
            remote.call(self.ledger.update, trial_id, usd, timeout_s=10.0)
            if trial_id not in self.started():
                unsettled_usd += max(0.0, usd - spent_usd)
        if unsettled_usd > 0:
            import uuid

            key = f"pack:hung:{uuid.uuid4().hex[:8]}"  # its own key: billed once
            remote.call(self.ledger.charge_once, key, unsettled_usd, timeout_s=10.0)
        self.control.ended = self.control.ended or why


def make_watchdog(spec, ledger, price_usd_per_hour: float, control, sweep_id: str = ""):
    """The sweep's watchdog: :class:`PackWatchdog` when its LoRA phase runs packed."""
    from orchestrator.pack_sweep import PACKED_PHASE, host_name, slots

    if slots(spec) <= 1:
        return Watchdog(ledger, price_usd_per_hour, control)

    return PackWatchdog(ledger, price_usd_per_hour, control, host_name(sweep_id, PACKED_PHASE))
