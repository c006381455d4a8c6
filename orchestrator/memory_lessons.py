"""What the sweep learned from trials that ran out of memory: a config that failed for memory is
not proposed again at that size.

The memory estimate (``workers/memory.py``) is a prediction; a trial that hits out-of-memory
anyway (CUDA OOM, Python's ``MemoryError``) proves that its size does not fit. Its "size" is
what drives memory for a given model and data: method, target modules, rank, micro-batch and
gradient checkpointing. A later proposal at least as large (same method and targets, rank >=,
micro-batch >=, checkpointing no more) is first made smaller (gradient checkpointing on, then
half the micro-batch, same effective batch) and skipped only when nothing smaller is left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

OOM_MARKERS = ("OutOfMemoryError", "out of memory", "MemoryError", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: str | None) -> bool:
    """Whether a failed trial's error is an out-of-memory one."""
    return bool(error) and any(m in error for m in OOM_MARKERS)


@dataclass(frozen=True)
class Size:
    method: str
    target_modules: str
    rank: int
    micro_batch: int  # rows per forward pass
    gradient_checkpointing: bool

    @classmethod
    def of(cls, config: dict, batch_size: int) -> Size:
        return cls(
            method=str(config.get("method")),
            target_modules=str(config.get("target_modules")),
            rank=int(config.get("rank") or 0),
            micro_batch=int(config.get("micro_batch") or batch_size),
            gradient_checkpointing=bool(config.get("gradient_checkpointing", False)),
        )

    def at_least(self, other: Size) -> bool:
        """Whether this size needs at least the memory ``other`` needed."""
        return (
            (self.method, self.target_modules) == (other.method, other.target_modules)
            and self.rank >= other.rank
            and self.micro_batch >= other.micro_batch
            and (other.gradient_checkpointing or not self.gradient_checkpointing)
        )


class MemoryLessons:
    """The sizes that ran out of memory in this sweep (kept in the searcher's saved state, so a
    resumed sweep remembers them)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.failed: list[Size] = []

    def learn(self, config: dict, error: str | None) -> bool:
        """Record ``config``'s size if its trial failed for memory; returns whether it did."""
        if not is_out_of_memory(error):
            return False
        size = Size.of(config, self.batch_size)
        if size not in self.failed:
            self.failed.append(size)
        return True

    def _too_big(self, size: Size) -> Size | None:
        return next((f for f in self.failed if size.at_least(f)), None)

    def adjust(self, config: dict) -> tuple[dict, str | None]:
        """Updates that make ``config`` smaller than every size that failed, or a skip reason
        (``memory: ...``) when no smaller size is left; ``({}, None)`` when it never failed."""
        updates: dict = {}
        while True:
            current = Size.of({**config, **updates}, self.batch_size)
            failed = self._too_big(current)
            if failed is None:
                return updates, None
            if not current.gradient_checkpointing:
                updates["gradient_checkpointing"] = True
            elif current.micro_batch > 1:
                updates["micro_batch"] = current.micro_batch // 2
            else:
                return {}, (
                    f"memory: {current.method} r{current.rank} {current.target_modules} ran out "
                    f"of memory in this sweep at micro-batch {failed.micro_batch}"
                    f"{' with gradient checkpointing' if failed.gradient_checkpointing else ''}; "
                    "nothing smaller is left to try"
                )

    def get_state(self) -> list[dict]:
        return [asdict(s) for s in self.failed]

    def set_state(self, state: list[dict]) -> None:
        self.failed = [Size(**s) for s in state]
