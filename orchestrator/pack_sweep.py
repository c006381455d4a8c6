"""Packed trials in the sweep (``resources.pack_slots: K``, K > 1): the LoRA phase's trials run
as K slots of one shared pack on the GPU (``orchestrator/pack_host.py``), each still one Tune
trial with its Optuna suggestion, ASHA rungs, MLflow child run, ledger account and budget checks.

How the phase changes, and nothing else does (``pack_slots: 1`` is the unpacked sweep exactly):
- one pack host, a named Ray actor holding the GPU(s) of one trial (``gpus_per_trial``), starts
  with the phase and loads the base once, before the first trial starts; a slot freed by a
  finished or pruned trial is taken by the next admitted trial without reloading it;
- the trials' Tune actors hold CPUs only (``cpus_per_trial``; they wait on the host), and up to K
  run at once;
- a trial's bill is its slot's share of the host's held seconds at the trial price (by token
  share of each step; its own eval and save), heartbeats included; what no slot paid (the host's
  start before the first slot, an empty pack, the tail after the last trial left) is charged to
  the sweep when the phase ends, on a key of its own. So the phase's bills add up to the host's
  held time x price, and the trial actors' own time is not billed again (their CPUs come with
  the GPU the host bills);
- full fine-tuning (the ``full`` phase) runs unpacked, as before.

Refused before any money is spent (:func:`refusal`, checked by the spec): more than one pack at
once, a pack over several GPUs, qlora, full or DoRA among the LoRA phase's candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import remote

PACKED_PHASE = "lora"


def wants_pack(res) -> bool:
    """Whether ``resources`` asks for a pack: ``pack_slots`` > 1 or ``auto`` (which the memory
    estimate may still resolve to 1, ``orchestrator/pack_plan.py``)."""
    return res.pack_slots == "auto" or res.pack_slots > 1


def slots(spec) -> int:
    """The spec's pack size K; ``auto`` must have been resolved first (``make_plan`` picks K,
    :func:`resolved` writes it into the spec the sweep runs)."""
    k = spec.resources.pack_slots
    if k == "auto":
        raise ValueError(
            "resources.pack_slots: auto is resolved before a sweep runs (make_plan picks K, "
            "resolved(spec, plan) writes it into the spec)"
        )
    return k


def resolved(spec, plan):
    """``spec`` with ``resources.pack_slots: auto`` replaced by the K ``plan`` chose (the sweep
    runs and logs that number; a resume resolves auto again, the same way); ``spec`` itself
    otherwise."""
    if spec.resources.pack_slots != "auto" or plan.pack is None:
        return spec
    resources = spec.resources.model_copy(update={"pack_slots": plan.pack.slots})
    return spec.model_copy(update={"resources": resources})


def refusal(spec) -> tuple[str, str] | None:
    """(field, message) when the spec's ``resources.pack_slots`` cannot run, else None.
    ``auto`` is held to the same rules as an explicit K > 1 (it is a request to pack)."""
    res, space = spec.resources, spec.search_space
    if not wants_pack(res):
        return None
    k = res.pack_slots
    if res.max_concurrent_trials != 1:
        return (
            "resources.max_concurrent_trials",
            f"with pack_slots: {k} one pack runs its slots' trials at once on one GPU; set "
            "max_concurrent_trials: 1 (several packs at once are not supported yet)",
        )
    if res.gpus_per_trial > 1:
        return (
            "resources.gpus_per_trial",
            f"a pack holds one GPU (got {res.gpus_per_trial}); set gpus_per_trial: 1 or "
            "pack_slots: 1",
        )
    methods = set(space.method.candidates())
    if methods - {"lora"}:
        return (
            "search_space.method",
            f"packed trials train LoRA adapters over one shared base; {sorted(methods - {'lora'})}"
            " cannot be packed: use method: lora (full FT runs unpacked in its own phase: full:"
            " max_runs) or pack_slots: 1",
        )
    if True in space.use_dora.candidates():
        return (
            "search_space.use_dora",
            "DoRA trials run unpacked: set use_dora: false or pack_slots: 1",
        )
    return None


def packed(spec, phase: str) -> bool:
    """Whether ``phase``'s trials run as slots of a pack."""
    return slots(spec) > 1 and phase == PACKED_PHASE


@dataclass(frozen=True)
class PackedFit:
    """The packed phase's memory admission. ``make_plan`` checked that a pack of the space's
    dearest slots fits (``orchestrator/pack_plan.py``), so every config fits as proposed (a pack
    steps each slot's whole batch: no micro-batches); each is marked with its pack's K, which
    its MLflow run logs (param ``pack_slots``, tag ``lorasweep.packed``)."""

    slots: int

    def __call__(self, config: dict) -> tuple[dict, str | None]:
        return {"pack_slots": self.slots}, None


def memory_fit(spec, plan, phase: str):
    """What ``phase``'s searcher checks a proposed config's memory with."""
    return PackedFit(slots(spec)) if packed(spec, phase) else plan.memory_fit


def host_name(sweep_id: str, phase: str) -> str:
    return f"lorasweep-pack-{sweep_id}-{phase}"


def trial_resources(spec, phase: str) -> dict:
    """What one Tune trial actor requests."""
    res = spec.resources
    if packed(spec, phase):
        return {"cpu": res.cpus_per_trial, "gpu": 0}
    return {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}


def concurrency(spec, phase: str) -> int:
    res = spec.resources
    return slots(spec) if packed(spec, phase) else res.max_concurrent_trials


def start_host(spec, plan, sweep_id: str, phase: str):
    """The phase's pack host (a named Ray actor, loading the base), or None when unpacked."""
    if not packed(spec, phase):
        return None
    import ray

    from orchestrator.pack_host import actor_class

    res = spec.resources
    on_gpu = res.gpus_per_trial > 0
    actor = actor_class().options(
        name=host_name(sweep_id, phase),
        get_if_exists=True,
        num_gpus=res.gpus_per_trial,
        # its threads wait on the GPU; on CPU it computes with the trials' cores (they wait)
        num_cpus=0,
        max_concurrency=slots(spec) + 2,
    )
    host = actor.remote(
        plan.model_ref,
        dtype=spec.model.dtype,
        device="cuda" if on_gpu else "cpu",
        num_threads=None if on_gpu else res.cpus_per_trial * slots(spec),
    )
    # loaded before any trial starts: a trial waiting on the load would show the watchdog no
    # spend for as long (its bill starts with its slot), and the load is the slots' to pay
    ray.get(host.held_s.remote())
    return host


def finish_host(spec, plan, ledger, sweep_id: str, phase: str) -> float:
    """End the phase's pack: every slot left, the held seconds no slot paid charged to the sweep
    (returned, in USD); the host's actor is stopped. 0 when the phase ran unpacked."""
    if not packed(spec, phase):
        return 0.0
    import uuid

    import ray

    from orchestrator.prices import cost_usd

    try:
        host = ray.get_actor(host_name(sweep_id, phase))
    except ValueError:
        return 0.0  # never started
    try:
        unbilled_s = float(ray.get(host.shutdown.remote(), timeout=120))
        usd = cost_usd(plan.price_usd_per_hour, unbilled_s)
        if usd > 0:
            key = f"pack:{phase}:{uuid.uuid4().hex[:8]}"  # its own key: billed once
            remote.call(ledger.charge_once, key, usd)
        return usd
    except Exception:  # noqa: BLE001 - never mask how the phase ended
        return 0.0
    finally:
        ray.kill(host)
