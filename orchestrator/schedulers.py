"""Tune's trial schedulers, holding pending trials once the sweep is interrupted.

After Ctrl-C (or SIGTERM, a cancel) no new trial may start: the searcher proposes none, but
trials Tune already created wait PENDING for a free slot and would start as soon as a closing
trial frees one, only to be interrupted at once (and use up the sweep's ``max_trials``). These
schedulers choose no trial to run while the sweep is interrupted; the pending ones stay pending in
Tune's saved state, and ``lorasweep resume`` runs them. Pickled with the experiment, they keep only
the sweep id and ask this driver's live control (as ``SweepStopper`` does).
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from orchestrator.callbacks import interrupted


class _HoldsPendingWhenInterrupted:
    sweep_id: str = ""

    def choose_trial_to_run(self, tune_controller):
        if interrupted(self.sweep_id):
            return None
        return super().choose_trial_to_run(tune_controller)


class SweepASHA(_HoldsPendingWhenInterrupted, AsyncHyperBandScheduler):
    """ASHA (Tune's ``ASHAScheduler``) for sweep ``sweep_id``."""

    def __init__(self, sweep_id: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sweep_id = sweep_id


class SweepFIFO(_HoldsPendingWhenInterrupted, FIFOScheduler):
    """First in, first out, for sweep ``sweep_id``."""

    def __init__(self, sweep_id: str) -> None:
        super().__init__()
        self.sweep_id = sweep_id
