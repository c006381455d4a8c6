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
"""

from __future__ import annotations

from orchestrator.prices import cost_usd
from orchestrator.watchdog import Watchdog


class PackWatchdog(Watchdog):
    def __init__(self, ledger, price_usd_per_hour: float, control, host_name: str = "") -> None:
        super().__init__(ledger, price_usd_per_hour, control)
        self.host_name = host_name  # the pack host's Ray actor name

    def _estimate(self, w, now: float) -> float:
        return w.spent_usd + cost_usd(self.price_usd_per_hour, now - w.seen)

    def since_heartbeat_usd(self, trial_id: str) -> float | None:
        """What a trial the driver learns has ended spent. A slot Tune stopped (ASHA) while its
        function still ran never left the pack itself: it leaves now and its slot's exact bill
        is the answer, instead of its last heartbeat plus the time since at the GPU's full
        price (what a trial holding its own GPU pays until its actor is reset)."""
        heartbeat_usd = super().since_heartbeat_usd(trial_id)
        if heartbeat_usd is None or not self.host_name:
            return heartbeat_usd
        try:
            import ray

            host = ray.get_actor(self.host_name)
            billed_s = float(ray.get(host.leave.remote(trial_id), timeout=30))
        except Exception:  # noqa: BLE001 - no host (phase over, unpacked phase): the bound
            return heartbeat_usd
        if billed_s <= 0:  # it had left itself: its last word is its bill
            return heartbeat_usd
        with self._lock:
            w = self._watched.get(trial_id)
            reported_usd = w.spent_usd if w is not None else 0.0
        return max(reported_usd, cost_usd(self.price_usd_per_hour, billed_s))


def make_watchdog(spec, ledger, price_usd_per_hour: float, control, sweep_id: str = ""):
    """The sweep's watchdog: :class:`PackWatchdog` when its LoRA phase runs packed."""
    from orchestrator.pack_sweep import PACKED_PHASE, host_name, slots

    if slots(spec) <= 1:
        return Watchdog(ledger, price_usd_per_hour, control)

    return PackWatchdog(ledger, price_usd_per_hour, control, host_name(sweep_id, PACKED_PHASE))
