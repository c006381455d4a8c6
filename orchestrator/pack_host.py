"""One GPU's pack, shared by the trials that run as its slots (``workers/packed.py``).

A :class:`PackHost` holds the frozen base once (``Pack``), the :class:`~workers.packed.PackServer`
that steps every slot that handed in its rows together, and each slot's data: its training rows
drawn in its own seed's order (as ``workers.train.run_trial`` draws them) and its validation rows.
Trials call it by their trial id: ``join`` -> ``step`` ... -> ``close`` (eval and adapter) ...
-> ``leave``. Nothing but ids and numbers cross the boundary per step; the adapter comes back as
its files' bytes, so the trial's process writes its own checkpoint (any node).

Under Ray the host is one threaded actor (:func:`remote_host`) holding the GPU: the trials'
Tune actors hold only CPUs, and each trial's bill is its slot's share of the host's held seconds
(``HoldBilling``, by token share of each step; a slot's eval and save its own): every second the
host holds the GPU goes to some trial, or is returned by ``shutdown`` for the sweep to charge. Its
clock starts when the host's process started (``workers/held.py``): loading the base is billed
to the first slots, as a trial alone pays its own load.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers.held import held_since

_HELD_SINCE = held_since(time.monotonic())  # before the heavy imports: they are held time


@dataclass
class _SlotData:
    key: str
    cfg: object  # workers.train.TrialConfig
    batches: object  # iterator of row lists, the trial's own order
    val: list
    billed_s: float = 0.0  # closed bill of this slot's trial so far (live part in billing)
    steps: int = field(default=0)


class PackHost:
    """A pack over ``model_ref`` on ``device`` (see the module docstring).

    Args:
        model_ref: resolved base model reference (a local folder or HF id).
        dtype: "auto" (bf16 on GPU, float32 on CPU), or a torch dtype name.
        device: "cuda" or "cpu".
        method: "lora" or "qlora" (every slot's method).
        wait_s: a packed step runs once every slot handed in rows, or this long after the first.
        start_monotonic: when the host's resources were acquired (default: its process start).
    """

    def __init__(
        self,
        model_ref: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        method: str = "lora",
        wait_s: float = 0.05,
        num_threads: int | None = None,
        start_monotonic: float | None = None,
    ) -> None:
        import torch

        from workers.model import load_tokenizer
        from workers.packed import HoldBilling, Pack, PackServer

        if device == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        billing = HoldBilling(start_monotonic=start_monotonic or _HELD_SINCE)
        pack = Pack.load(model_ref, dtype=dtype, device=device, method=method)
        self.server = PackServer(pack, wait_s=wait_s, billing=billing)
        self.tokenizer = load_tokenizer(model_ref)
        self.device = device
        self._slots: dict[str, _SlotData] = {}
        self._lock = threading.Lock()  # the slot table (the server locks the pack itself)
        self._closed = False

    # slots ----------------------------------------------------------------------------------

    def join(self, trial_id: str, cfg) -> str:
        """Add the trial as a slot (a fresh adapter from its seed; the base is not reloaded)."""
        from workers.data import read_examples
        from workers.train import _batches, _encoded_train_rows

        with self._lock:
            if self._closed:
                raise RuntimeError("the pack was shut down: the sweep has ended")
            if trial_id in self._slots:
                raise ValueError(f"trial {trial_id} is already in this pack")
        train = _encoded_train_rows(self.tokenizer, cfg)
        val = read_examples(Path(cfg.validation_path), cfg.data_format, "data.validation")
        key = self.server.join(cfg)
        with self._lock:
            self._slots[trial_id] = _SlotData(
                key, cfg, _batches(train, cfg.batch_size, cfg.seed), val[: cfg.eval_examples]
            )
        return key

    def step(self, trial_id: str) -> dict:
        """One optimizer step of the trial's slot, packed with whichever slots step now: its
        loss, its tokens and its bill so far (seconds)."""
        slot = self._slots[trial_id]
        result = self.server.step(slot.key, next(slot.batches))
        slot.steps += 1
        return {"loss": result.loss, "tokens": result.tokens, "billed_s": self.billed_s(trial_id)}

    def close(self, trial_id: str) -> dict:
        """The trial's eval (loss and greedy-generation score on its validation rows) and its
        adapter as PEFT saves it, as files' bytes; the time is billed to this slot alone."""
        import tempfile

        from workers import evaluate

        slot = self._slots[trial_id]
        cfg = slot.cfg
        with self.server.closing(slot.key) as model, tempfile.TemporaryDirectory() as tmp:
            model.eval()
            result = evaluate.evaluate(
                model,
                self.tokenizer,
                slot.val,
                cfg.max_seq_len,
                cfg.max_new_tokens,
                cfg.batch_size,
                evaluate.token_allowance(cfg.batch_size, cfg.max_seq_len),
                prompt_limit=(
                    cfg.max_seq_len - cfg.max_new_tokens if cfg.truncation == "left" else None
                ),
            )
            self.server.pack.save(slot.key, tmp)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        return {
            "eval_loss": result["eval_loss"],
            "score": evaluate.score(result["generations"], [e.answer for e in slot.val]),
            "eval_tokens_generated": result["tokens_generated"],
            "eval_decode_steps": result["decode_steps"],
            "files": files,
            "billed_s": self.billed_s(trial_id),
        }

    def leave(self, trial_id: str) -> float:
        """Take the trial's slot out (finished, pruned, failed or stopped); returns its whole
        bill in seconds. Leaving twice, or a trial that never joined, returns 0."""
        with self._lock:
            slot = self._slots.pop(trial_id, None)
        if slot is None:
            return 0.0
        return self.server.leave(slot.key)

    # billing --------------------------------------------------------------------------------

    def billed_s(self, trial_id: str) -> float:
        """Seconds billed to the trial's slot so far (as of the last settlement)."""
        slot = self._slots.get(trial_id)
        return 0.0 if slot is None else self.server.billing.billed_s.get(slot.key, 0.0)

    def shutdown(self) -> float:
        """The sweep is done with the pack: every slot still in it leaves (a trial the watchdog
        killed never left itself), no trial joins any more, and the held seconds no slot paid
        (loading before the first slot, an empty pack, the tail after the last left) are
        returned for the sweep to charge. Called once; later calls return 0."""
        with self._lock:
            if self._closed:
                return 0.0
            self._closed = True
            left = list(self._slots)
        for trial_id in left:
            self.leave(trial_id)
        billing = self.server.billing
        with self.server._gpu:
            billing.settle({})  # empty now: the time since the last settlement waits, unbilled
            return billing.pending_s

    def held_s(self) -> float:
        return self.server.billing.held_s()

    def unbilled_s(self) -> float:
        """Held seconds no slot paid yet (the base's load before the first slot, an empty
        pack): the slots of the next packed step pay them (``HoldBilling``). Without a lock."""
        return self.server.billing.unsettled_s()

    def live_bills(self) -> dict:
        """What the watchdog reads every poll (``orchestrator/pack_watchdog.py``), without a
        lock, so that it answers while a step hangs holding the pack: ``bills`` (trial id ->
        seconds billed to its slot as of now, the GPU call in flight's share included),
        ``busy`` (the trial ids in that call) and ``busy_s`` (how long it has run; 0 when none).
        Called in its own concurrency group (:data:`BILLING_GROUP`): a hung step's waiting
        calls may fill the default group's threads."""
        bills, busy, busy_s = self.server.live()
        by_key = {slot.key: trial_id for trial_id, slot in list(self._slots.items())}
        return {
            "bills": {by_key[k]: s for k, s in bills.items() if k in by_key},
            "busy": sorted(by_key[k] for k in busy if k in by_key),
            "busy_s": busy_s,
        }

    def trials(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def stats(self) -> dict:
        """Slots per packed step -> steps run (how well the trials packed)."""
        return dict(self.server.step_sizes)


BILLING_GROUP = "billing"  # the Ray concurrency group of ``live_bills``


def actor_class():
    """:class:`PackHost` as a Ray actor class, with a concurrency group of its own for the
    watchdog's ``live_bills`` (call it as ``host.live_bills.options(concurrency_group=
    BILLING_GROUP).remote()``)."""
    import ray

    return ray.remote(concurrency_groups={BILLING_GROUP: 1})(PackHost)


def remote_host(num_gpus: int, num_cpus: int, max_slots: int, **kwargs):
    """The host as a Ray actor holding ``num_gpus`` GPUs, one thread per slot (and one spare for
    the sweep's billing calls)."""
    actor = actor_class().options(
        num_gpus=num_gpus, num_cpus=num_cpus, max_concurrency=max_slots + 2
    )
    return actor.remote(**kwargs)
