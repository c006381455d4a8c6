"""What trial actors hold outside every trial's bill (orchestrator/actor_spans.py), on a real
local Ray: actors that record their birth as the trainable module does, Ray's own actor table,
and each process's lifetime read by this test from the OS (/proc), not from the code under test.
The actor class is named as Tune's function-trainable actor; nothing of Ray is faked."""

from __future__ import annotations

import os
import time

import pytest

from orchestrator import actor_spans


def _proc_birth_unix(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime_s = float(f.read().split()[0])
    return time.time() - (uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))


def _wait_gone(pid: int, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:  # a zombie has gone from the lease: its stat says Z
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.02)
    return time.time()


@pytest.fixture(scope="module")
def trial_actor_class(ray_module):
    import ray

    class ImplicitFunc:  # as Tune's actor for a function trainable
        def __init__(self, loading_s: float = 0.0):
            from orchestrator.actor_spans import record_birth
            from workers.held import held_since

            held = held_since(time.monotonic())
            self.worker = f"{os.uname().nodename}:{os.getpid()}"
            self.recorded = record_birth(self.worker, time.time() - (time.monotonic() - held))
            time.sleep(loading_s)  # as Tune's actor, importing torch and the trainable

        def who(self):
            return self.worker, os.getpid(), self.recorded

    ImplicitFunc.__qualname__ = "ImplicitFunc"  # Ray names an actor class by its qualified name
    return ray.remote(num_cpus=1, max_restarts=0)(ImplicitFunc)


def test_an_unused_actor_is_billed_birth_to_death_and_a_used_one_from_its_last_word(
    trial_actor_class,
):
    import ray

    unused, used = trial_actor_class.remote(0.5), trial_actor_class.remote(0.5)
    (w_unused, pid_unused, rec1), (w_used, pid_used, rec2) = ray.get(
        [unused.who.remote(), used.who.remote()]
    )
    assert rec1 and rec2  # inside an actor the birth is recorded
    births = {pid: _proc_birth_unix(pid) for pid in (pid_unused, pid_used)}
    began = time.time()
    time.sleep(0.3)
    last_word = time.time()  # the used actor's trial ends here; the actor idles on
    time.sleep(0.7)
    ray.kill(unused)
    ray.kill(used)
    deaths = {pid: _wait_gone(pid) for pid in (pid_unused, pid_used)}

    spans = actor_spans.trial_actor_spans()
    assert spans is not None
    mine = {s.worker: s for s in spans if s.worker in (w_unused, w_used)}
    assert set(mine) == {w_unused, w_used}
    held = actor_spans.unbilled_s(list(mine.values()), {w_used: (began, last_word)}, time.time())

    outside_unused_s = deaths[pid_unused] - births[pid_unused]
    outside_tail_s = deaths[pid_used] - last_word
    # Ray's death record and the OS's agree to a fraction of a second, and the bill is never
    # more than the process lived
    assert held[mine[w_unused].actor_id] == pytest.approx(outside_unused_s, abs=0.35)
    assert held[mine[w_unused].actor_id] <= outside_unused_s + 0.05
    assert held[mine[w_used].actor_id] == pytest.approx(outside_tail_s, abs=0.35)
    assert held[mine[w_used].actor_id] <= outside_tail_s + 0.05


def test_an_actor_cut_off_mid_trial_adds_nothing_its_trial_bills_to_the_end():
    span = actor_spans.ActorSpan("a1", "n:1", birth_unix=100.0, end_unix=130.0)
    # its latest trial began after its latest last word: that trial's own account runs on
    assert actor_spans.unbilled_s([span], {"n:1": (120.0, 110.0)}, now_unix=200.0) == {}
    assert actor_spans.unbilled_s([span], {"n:1": (120.0, None)}, now_unix=200.0) == {}
    # a live actor is billed to now
    alive = actor_spans.ActorSpan("a2", "n:2", birth_unix=100.0, end_unix=None)
    assert actor_spans.unbilled_s([alive], {}, now_unix=104.5) == {"a2": 4.5}


def test_the_driver_records_no_birth(ray_module):
    # the driver imports the trainable module too: only actors record
    assert actor_spans.record_birth("driver:1", time.time()) is False


def test_an_actors_teardown_after_rays_death_record_is_billed_as_seen_or_as_the_median():
    # Ray marks an actor dead as it starts to exit; its process goes 0.4 s later: the watched
    # one is billed to its exit, an unwatched one (it exited earlier, or on another node) to
    # Ray's record plus the median teardown seen
    watched = actor_spans.ActorSpan("w", "n:1", birth_unix=100.0, end_unix=110.0, exit_unix=110.4)
    earlier = actor_spans.ActorSpan("e", "n:2", birth_unix=100.0, end_unix=105.0)
    held = actor_spans.unbilled_s([watched, earlier], {}, now_unix=200.0)
    assert held == {"w": pytest.approx(10.4), "e": pytest.approx(5.4)}
    # nothing watched: Ray's record alone
    assert actor_spans.unbilled_s([earlier], {}, now_unix=200.0) == {"e": pytest.approx(5.0)}
