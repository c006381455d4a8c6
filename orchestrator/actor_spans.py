"""What Tune's trial actors held outside every trial's own bill, from Ray's records of them.

A trial is billed from when its worker process started (``workers/held.py``) until its last word.
Two kinds of held time fall outside that, and both are real GPU seconds:

- an actor Tune started and then never gave a trial: after a lost worker, Tune starts a new actor
  for the retry, hands the retry a cached actor that came free meanwhile (``reuse_actors``) and
  stops the new one unused; an actor killed while it was still loading is the same;
- a used actor's tail: from its last trial's last word until Tune stopped it (kept in Tune's cache
  while the search decided, or while an interrupted sweep held its pending trials).

Each trial actor records its process's birth (wall clock) in Ray's cluster-wide key-value store
as this module loads in it (``record_birth``, called by ``orchestrator/trainable.py``). After a
phase the driver joins those records with Ray's actor table (when each actor died) and the
ledger's record of which processes ran trials and when their last trials' last words came.
The actor table is read through ``ray._private.state`` (the public ``ray.util.state`` needs the
dashboard, which lorasweep's local clusters do not start); where it cannot be read, the ledger's
bounded tails (``Ledger.idle_tails``) are the fallback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace

KV_NAMESPACE = "lorasweep"
TRIAL_ACTOR_CLASS = "ImplicitFunc"  # Ray Tune's actor class for a function trainable
DEATH_WAIT_S = 3.0  # after a phase, how long to wait for Tune's last actors to be stopped
EXIT_WAIT_S = 3.0  # ... and for this node's dead actors' processes to exit


def _key(job_id: str, actor_id: str) -> str:
    return f"birth:{job_id}:{actor_id}"


def record_birth(worker: str, birth_unix: float) -> bool:
    """In a Ray actor: store this process's ``worker`` name and birth under its actor id. Does
    nothing (False) outside an actor, as on the driver, which imports the same module."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        ctx = ray.get_runtime_context()
        actor_id = ctx.get_actor_id()
        if actor_id is None:
            return False
        from ray.experimental import internal_kv

        value = json.dumps({"worker": worker, "birth_unix": birth_unix})
        key = _key(ctx.get_job_id(), actor_id)
        internal_kv._internal_kv_put(key, value, namespace=KV_NAMESPACE)
        return True
    except Exception:  # noqa: BLE001 - billing falls back to the ledger's bounded tails
        return False


@dataclass(frozen=True)
class ActorSpan:
    actor_id: str
    worker: str  # "<node>:<pid>", as the ledger names processes
    birth_unix: float
    end_unix: float | None  # None while the actor is alive
    exit_unix: float | None = None  # when its process was seen gone (this node's, if watched)


def _births(job_id: str) -> dict[str, dict]:
    from ray.experimental import internal_kv

    out = {}
    prefix = f"birth:{job_id}:"
    for key in internal_kv._internal_kv_list(prefix, namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw:
            out[key.decode()[len(prefix) :]] = json.loads(raw)
    return out


def _actor_table(job_id: str, class_name: str) -> dict[str, dict]:
    from ray._private import state

    table = state.actors()
    return {
        aid: a
        for aid, a in table.items()
        if a.get("JobID") == job_id and a.get("ActorClassName") == class_name
    }


def trial_actor_spans(
    born_after_unix: float = 0.0,
    job_id: str | None = None,
    class_name: str = TRIAL_ACTOR_CLASS,
    wait_s: float = DEATH_WAIT_S,
) -> list[ActorSpan] | None:
    """This job's trial actors born after ``born_after_unix`` (a phase's start: one driver runs
    one sweep, and an earlier sweep run by the same process is not this one's) that recorded a
    birth, with when each died; waits up to ``wait_s`` for the live ones to be stopped. None
    when Ray's records cannot be read."""
    try:
        import ray

        job_id = job_id or ray.get_runtime_context().get_job_id()
        deadline = time.monotonic() + wait_s
        while True:
            actors = _actor_table(job_id, class_name)
            alive = [a for a in actors.values() if a.get("State") != "DEAD"]
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        births = _births(job_id)
    except Exception:  # noqa: BLE001 - private API: a Ray without it bills the bounded tails
        return None
    spans = []
    for actor_id, birth in births.items():
        actor = actors.get(actor_id)
        if actor is None or float(birth["birth_unix"]) < born_after_unix:
            continue
        dead = actor.get("State") == "DEAD" and actor.get("EndTime")
        spans.append(
            ActorSpan(
                actor_id=actor_id,
                worker=birth["worker"],
                birth_unix=float(birth["birth_unix"]),
                end_unix=float(actor["EndTime"]) / 1000.0 if dead else None,
            )
        )
    return _with_exits(spans, EXIT_WAIT_S)


def _local_pid(worker: str) -> int | None:
    node, _, pid = worker.rpartition(":")
    return int(pid) if node == os.uname().nodename and pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds nothing
    except (OSError, IndexError):
        return False


def _with_exits(spans: list[ActorSpan], wait_s: float) -> list[ActorSpan]:
    """Ray records an actor dead as it begins to exit; its process holds on while Python and
    Ray tear down (~0.4 s with torch loaded). Where that process is on this node and still
    there (the phase's last actors), watch it go, up to ``wait_s``."""
    if not os.path.isdir("/proc/self"):
        return spans
    watched = {}
    for span in spans:
        pid = _local_pid(span.worker)
        if span.end_unix is not None and pid is not None and _running(pid):
            watched[span.actor_id] = pid
    exits: dict[str, float] = {}
    deadline = time.monotonic() + wait_s
    while watched and time.monotonic() < deadline:
        for actor_id, pid in list(watched.items()):
            if not _running(pid):
                exits[actor_id] = time.time()
                del watched[actor_id]
        time.sleep(0.02)
    return [replace(s, exit_unix=exits[s.actor_id]) if s.actor_id in exits else s for s in spans]


def unbilled_s(
    spans: list[ActorSpan], workers: dict[str, tuple[float, float | None]], now_unix: float
) -> dict[str, float]:
    """Seconds per actor that no trial's bill covers. ``workers`` maps each process that ran a
    trial to (when its latest trial began, when its latest last word came; unix seconds, None
    if that trial gave none). An actor that ran no trial is unbilled from birth to death; a used
    one from its latest last word to its death, when that last word came after its latest
    trial began (otherwise that trial was cut off: its own account bills it to the end). An
    actor's death is when its process was seen gone, else Ray's record of it plus the median
    teardown seen (``_with_exits``)."""
    # the teardown after Ray's death record, as seen where it was watched, applies to the rest
    lags = sorted(s.exit_unix - s.end_unix for s in spans if s.exit_unix and s.end_unix)
    teardown_s = max(0.0, lags[len(lags) // 2]) if lags else 0.0
    out = {}
    for span in spans:
        if span.end_unix is None:
            end = now_unix
        elif span.exit_unix is not None:
            end = max(span.exit_unix, span.end_unix)
        else:
            end = span.end_unix + teardown_s
        ran = workers.get(span.worker)
        if ran is None:
            held_s = end - span.birth_unix
        else:
            began, last_word = ran
            if last_word is None or last_word < began:
                continue
            held_s = end - last_word
        if held_s > 0:
            out[span.actor_id] = held_s
    return out
