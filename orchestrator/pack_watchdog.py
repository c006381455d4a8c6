"""The watchdog of a packed sweep (``resources.pack_slots`` > 1).

The sweep's watchdog estimates a trial's live spend as the more of (last heartbeat + price x the
time since) and (price x the time since the trial was registered). The second is a floor for a
trial that holds its own GPU: it pays the GPU's price every second, its start-up included. A
packed trial pays only its slot's share of the pack's held seconds (1/K of the price when K
slots step together), so that floor revokes slots well inside their grant (measured on the H200:
four slots revoked at ~11 s, their grant's worth of wall time, before their first eval). Here
the estimate is the since-heartbeat one alone: still an upper bound (a slot is never billed
faster than the GPU's price), so a slot that hangs, or whose heartbeats stop, is still revoked
and then killed within the same margins.
"""

from __future__ import annotations

from orchestrator.prices import cost_usd
from orchestrator.watchdog import Watchdog


class PackWatchdog(Watchdog):
    def _estimate(self, w, now: float) -> float:
        return w.spent_usd + cost_usd(self.price_usd_per_hour, now - w.seen)


def make_watchdog(spec, ledger, price_usd_per_hour: float, control) -> Watchdog:
    """The sweep's watchdog: :class:`PackWatchdog` when its LoRA phase runs packed."""
    cls = PackWatchdog if spec.resources.pack_slots > 1 else Watchdog
    return cls(ledger, price_usd_per_hour, control)
