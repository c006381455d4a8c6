"""How many LoRA trials one pack holds (``resources.pack_slots``), decided before a cent is spent.

A pack (``workers/packed.py``) holds the base once and K slots, each with its adapter, its AdamW
state and the activations of its whole batch (a pack steps every slot's batch at once, with no
micro-batches and no gradient checkpointing). Any trial the search space can draw may take any
slot, so the pack is sized for the space's dearest slot: its largest rank on its widest target
set (the one whose adapter and activations take most memory), at ``trial.batch_size`` x
``trial.max_seq_len`` tokens (rows are packed without padding, so real steps take at most that).
``workers.memory.estimate_pack`` predicts the peak; packs are fitted to ``HEADROOM`` of the GPU,
as unpacked trials are (``orchestrator/memory_check.py``).

- ``pack_slots: K`` (K > 1): refused with the predicted GiB, the GPU's GiB and the largest K
  that fits when K slots do not fit.
- ``pack_slots: auto``: the largest K <= ``AUTO_MAX_SLOTS`` (and <= ``max_trials``) that fits;
  1 (unpacked: trials then fall back to micro-batches and checkpointing) when not even two fit.
  On ``accelerator: cpu`` there is no GPU memory to fit and auto is ``CPU_AUTO_SLOTS``.
- No estimate (a model the estimator has no shape for, a catalog row without ``memory_gib``):
  an explicit K runs unchecked, as unpacked trials do; auto is refused (it has nothing to pick
  by).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import SpecError
from orchestrator.pack_sweep import wants_pack

FIELD = "resources.pack_slots"
HEADROOM = 0.9  # share of the GPU's memory a pack may be predicted to use (as memory_check's)
AUTO_MAX_SLOTS = 8  # bench/packing.py measured packs up to K = 8
CPU_AUTO_SLOTS = 2  # no GPU memory to fit on CPU: a fixed, small pack (2 cores share its steps)


@dataclass(frozen=True)
class PackChoice:
    """The pack a sweep runs: ``slots`` (1: unpacked) and, where the estimator knows the GPU and
    the model, the predicted peak of ``slots`` slots of the space's dearest config."""

    requested: int | str  # the spec's value: an integer or "auto"
    slots: int
    reason: str  # how ``slots`` was chosen, in words (validate prints it)
    rank: int
    targets: str  # the space's widest target set (its key in workers.lora.TARGET_MODULES)
    batch: int
    seq: int
    accelerator: str
    memory_gib: float | None = None  # the GPU's, from the price catalog
    predicted_gib: float | None = None  # estimate_pack of ``slots`` dearest slots

    def line(self) -> str:
        """One line for ``lorasweep validate``."""
        what = f"lora r{self.rank} {self.targets}, batch {self.batch} x {self.seq} tokens"
        head = f"  pack: {self.slots} slot{'s' if self.slots != 1 else ''} ({self.reason})"
        if self.predicted_gib is None:
            return f"{head}; each slot up to {what}; no memory estimate on {self.accelerator}"
        return (
            f"{head}; each slot up to {what}: predicted peak {self.predicted_gib:.1f} GiB of the "
            f"{self.accelerator}'s {self.memory_gib:g} GiB (fitted to {HEADROOM:.0%})"
        )


def _dearest_slot(spec, shape) -> tuple[int, str, list[str] | str]:
    """(largest rank, widest target set's key, its module names) the search space can draw."""
    from workers.lora import TARGET_MODULES
    from workers.memory import estimate

    space, t = spec.search_space, spec.trial
    rank = int(max(space.rank.candidates()))
    widest = None
    for key in space.target_modules.candidates():
        targets = TARGET_MODULES[key]
        if shape is not None:
            try:
                shape.lora_input_width(targets)
            except KeyError:  # module names the estimator's Llama shape lacks: bound it above
                targets = "all-linear"
            size = estimate(
                shape, "lora", batch=t.batch_size, seq=t.max_seq_len, rank=rank, targets=targets
            ).total_gib
        else:
            size = 0.0
        if widest is None or size > widest[0]:
            widest = (size, key, targets)
    return rank, widest[1], widest[2]


def _pack_gib(shape, k: int, rank: int, targets, batch: int, seq: int) -> float:
    from workers.memory import estimate_pack

    return estimate_pack(shape, "lora", [(rank, targets)] * k, batch=batch, seq=seq).total_gib


def choose_pack(spec, memory_fit) -> PackChoice | None:
    """The pack ``spec`` runs, or None when it asks for none (``pack_slots: 1``). ``memory_fit``
    is the preflight's :class:`~orchestrator.memory_check.MemoryFit` (the model's shape and the
    GPU's memory), None where there is no estimate. Raises :class:`SpecError` on
    ``resources.pack_slots`` when an explicit K does not fit, or auto has nothing to pick by."""
    from workers.memory import pick_pack_size

    res, t = spec.resources, spec.trial
    if not wants_pack(res):
        return None
    requested = res.pack_slots
    shape = memory_fit.shape if memory_fit is not None else None
    rank, key, targets = _dearest_slot(spec, shape)
    common = dict(
        requested=requested,
        rank=rank,
        targets=key,
        batch=t.batch_size,
        seq=t.max_seq_len,
        accelerator=res.accelerator,
    )
    if memory_fit is None:
        if requested != "auto":
            return PackChoice(slots=requested, reason="pack_slots", **common)
        if res.accelerator == "cpu":
            k = min(CPU_AUTO_SLOTS, spec.max_trials)
            return PackChoice(slots=k, reason="auto on cpu: a fixed choice", **common)
        raise SpecError(
            FIELD,
            f"auto picks K by the memory estimate, which needs a Llama-family model config and "
            f"the GPU's memory_gib in the price catalog (none for {spec.model.name_or_path} on "
            f"{res.accelerator}); give an integer, e.g. pack_slots: 2",
        )
    memory_gib = memory_fit.memory_gib

    def gib(k: int) -> float:
        return _pack_gib(shape, k, rank, targets, t.batch_size, t.max_seq_len)

    def largest(max_slots: int) -> int:
        return pick_pack_size(
            shape,
            "lora",
            batch=t.batch_size,
            seq=t.max_seq_len,
            memory_gib=memory_gib,
            rank=rank,
            targets=targets,
            max_slots=max_slots,
            headroom=HEADROOM,
        )

    if requested == "auto":
        cap = min(AUTO_MAX_SLOTS, spec.max_trials)
        k = largest(cap)
        if k >= 2:
            reason = f"auto: the largest K <= {cap} that fits"
        else:
            k, reason = 1, "auto: not even 2 slots fit, so trials run unpacked"
        return PackChoice(
            slots=k, reason=reason, memory_gib=memory_gib, predicted_gib=gib(k), **common
        )
    need = gib(requested)
    if need > HEADROOM * memory_gib:
        fits = largest(16)
        fix = (
            f"the largest pack that fits is {fits} slots: set pack_slots: {fits} (or auto)"
            if fits >= 2
            else "not even 2 slots fit: set pack_slots: 1 (unpacked trials fall back to "
            "micro-batches and gradient checkpointing)"
        )
        raise SpecError(
            FIELD,
            f"{requested} slots of lora r{rank} {key} at batch {t.batch_size} x "
            f"{t.max_seq_len} tokens each are predicted to peak at {need:.1f} GiB; the "
            f"{res.accelerator} has {memory_gib:g} GiB (packs are fitted to {HEADROOM:.0%}: "
            f"{HEADROOM * memory_gib:.1f} GiB). {fix}, or lower trial.batch_size, "
            "trial.max_seq_len or the search space's largest rank",
        )
    return PackChoice(
        slots=requested,
        reason="pack_slots, fits the memory estimate",
        memory_gib=memory_gib,
        predicted_gib=need,
        **common,
    )
