"""The watchdog outside the trials, against a real ledger actor on local Ray; times are the
test's own monotonic clock. The trials here are stand-ins (a kill is recorded, not a process
killed); the end-to-end kill of a hung trial's real actor is in tests/test_cap_outside_clock.py."""

from __future__ import annotations

import time

import pytest

from orchestrator.budget import Ledger
from orchestrator.watchdog import GRACE_S, MARGIN_S, POLL_S, SweepControl, Watchdog

PRICE = 36.0  # $/h: one cent per second


@pytest.fixture
def ledger(ray_local):
    import ray

    actor = ray.remote(Ledger).options(num_cpus=0).remote(1.0)
    yield actor
    ray.kill(actor)


def _until(predicate, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_silent_trial_is_revoked_then_killed_past_its_ceiling(ledger):
    import ray

    assert ray.get(ledger.reserve.remote("t", 0.01))  # one second of grant
    control = SweepControl()
    kills = []
    dog = Watchdog(ledger, PRICE, control).start()
    t0 = time.monotonic()
    try:
        dog.watch("t", lambda: kills.append(time.monotonic() - t0))
        revoked_s = _until(lambda: "t" in control.revoked, 30)
        _until(lambda: kills, 30)
    finally:
        dog.stop()
    assert 1 + MARGIN_S <= revoked_s <= 1 + MARGIN_S + 3 * POLL_S
    assert ray.get(ledger.revoked.remote("t"))
    assert not ray.get(ledger.request.remote("t", 0.5))  # a revoked grant never rises
    assert 1 + MARGIN_S + GRACE_S <= kills[0] <= 1 + MARGIN_S + GRACE_S + 3 * POLL_S
    assert len(kills) == 1 and dog.kills == ["t"]
    killed_usd = dog.unwatch("t")
    assert killed_usd == pytest.approx((1 + MARGIN_S + GRACE_S) / 100, abs=3 * POLL_S / 100)
    assert control.fatal is None


def test_heartbeats_under_the_ceiling_keep_a_trial_alive(ledger):
    import ray

    assert ray.get(ledger.reserve.remote("t", 0.10))  # ten seconds of grant
    control, kills = SweepControl(), []
    dog = Watchdog(ledger, PRICE, control).start()
    t0 = time.monotonic()
    try:
        dog.watch("t", lambda: kills.append(1))
        while time.monotonic() - t0 < 4:
            ray.get(ledger.update.remote("t", (time.monotonic() - t0) / 100))
            time.sleep(0.5)
        live = dog.live_usd("t")
    finally:
        dog.stop()
    assert kills == [] and "t" not in control.revoked
    assert live == pytest.approx(0.04, abs=0.01)


def test_a_lost_ledger_stops_the_sweep_and_kills_every_trial(ray_local):
    import ray

    actor = ray.remote(Ledger).options(num_cpus=0).remote(1.0)
    assert ray.get(actor.reserve.remote("a", 0.5)) and ray.get(actor.reserve.remote("b", 0.4))
    control, kills = SweepControl(), []
    dog = Watchdog(actor, PRICE, control).start()
    try:
        dog.watch("a", lambda: kills.append("a"))
        dog.watch("b", lambda: kills.append("b"))
        ray.kill(actor, no_restart=True)
        _until(lambda: control.fatal is not None, 60)
    finally:
        dog.stop()
    assert sorted(kills) == ["a", "b"]
    assert "ledger" in control.fatal


def test_a_silent_trial_is_billed_on_from_when_its_last_spend_came_not_from_the_poll(ledger):
    """A lost worker's attempt is billed to the notice from its last heartbeat: the watchdog's
    poll that saw that heartbeat came later, and billing from the poll lost up to ``POLL_S``
    per lost worker (bench/fault_injection.py's unaccounted spend)."""
    import ray

    assert ray.get(ledger.reserve.remote("t", 1.0))
    dog = Watchdog(ledger, PRICE, SweepControl())  # not started: this test polls by hand
    dog.watch("t", lambda: None)
    ray.get(ledger.update.remote("t", 0.05))  # the trial's last heartbeat: five seconds' spend
    beat = time.monotonic()
    time.sleep(0.4)
    dog.check()  # the poll that sees it, 0.4 s later
    billed_usd = dog.since_heartbeat_usd("t")
    since_beat_s = time.monotonic() - beat
    assert billed_usd == pytest.approx(0.05 + since_beat_s / 100, abs=0.1 / 100)
