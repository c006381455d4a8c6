"""Admission by memory: a proposed config that would not fit the GPU is adjusted or skipped."""

from __future__ import annotations

from dataclasses import dataclass

from workers.lora import TARGET_MODULES
from workers.memory import ModelShape, estimate, fit_config


@dataclass(frozen=True)
class MemoryFit:
    """Callable on a proposed trial config: returns (config updates, skip reason or None).

    Tries the config as is, then gradient checkpointing, then smaller micro-batches with gradient
    accumulation (same effective batch), keeping the predicted peak under 90% of the GPU."""

    shape: ModelShape
    memory_gib: float
    accelerator: str
    batch: int
    seq: int

    def __call__(self, config: dict) -> tuple[dict, str | None]:
        method, rank = config["method"], int(config["rank"])
        targets = TARGET_MODULES[config["target_modules"]]
        fit = fit_config(
            self.shape,
            method,
            batch=self.batch,
            seq=self.seq,
            memory_gib=self.memory_gib,
            rank=rank,
            targets=targets,
        )
        if fit is None:
            need = estimate(
                self.shape,
                method,
                batch=1,
                seq=self.seq,
                rank=rank,
                targets=targets,
                gradient_checkpointing=True,
            ).total_gib
            return {}, (
                f"memory: {method} r{rank} {config['target_modules']} needs {need:.1f} GiB even at "
                f"micro-batch 1 with gradient checkpointing; {self.accelerator} has "
                f"{self.memory_gib:g} GiB"
            )
        micro, _, ckpt, est = fit
        updates: dict = {"predicted_gib": round(est.total_gib, 2)}
        if ckpt:
            updates["gradient_checkpointing"] = True
        if micro < self.batch:
            updates["micro_batch"] = micro
        return updates, None
