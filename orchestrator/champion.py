"""Whether a new model version beats the registered ``champion``, on the same split and scorer.

Each promoted version records what it was measured on (model version tags ``compare.*``): the
split (test when the data has one, else validation), the sha256 of that file's bytes, the scorer,
and its score and eval_loss there. A new version is compared with the champion by the sweep's
objective only on records with the same split hash and scorer; a champion measured elsewhere is
scored again on the new version's split (``registry.promote`` does that), never compared across
splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

ALIAS = "champion"
CHALLENGER = "challenger"  # a registered version that did not beat the champion
SCORER = "json_field_match"  # workers.evaluate.score: exact match of the answer's JSON fields
TAG = "compare."


@dataclass(frozen=True)
class Measure:
    """One model's result on one split with one scorer."""

    split: str  # test | validation
    split_sha256: str
    scorer: str
    score: float
    eval_loss: float

    def tags(self) -> dict[str, str]:
        return {
            f"{TAG}split": self.split,
            f"{TAG}split_sha256": self.split_sha256,
            f"{TAG}scorer": self.scorer,
            f"{TAG}score": repr(self.score),
            f"{TAG}eval_loss": repr(self.eval_loss),
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Measure | None:
        try:
            return cls(
                tags[f"{TAG}split"],
                tags[f"{TAG}split_sha256"],
                tags[f"{TAG}scorer"],
                float(tags[f"{TAG}score"]),
                float(tags[f"{TAG}eval_loss"]),
            )
        except (KeyError, ValueError):  # a version promoted before these records
            return None

    def same_ground(self, other: Measure) -> bool:
        return self.split_sha256 == other.split_sha256 and self.scorer == other.scorer


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def better(new: Measure, old: Measure, metric: str, mode: str) -> bool:
    """Strictly better by the objective (a tie keeps the champion)."""
    a, b = getattr(new, metric), getattr(old, metric)
    return a > b if mode == "max" else a < b


@dataclass
class Decision:
    move: bool  # point ``champion`` at the new version
    reason: str  # one line for the user


def decide(
    new: Measure,
    current_version: str | None,
    current: Measure | None,
    metric: str,
    mode: str,
    force: bool = False,
) -> Decision:
    """Move ``champion`` to the new version when there is none, when the new one is better on
    the same ground, or when forced; ``current`` must be measured on ``new``'s ground."""
    if current_version is None:
        return Decision(True, "no champion yet")
    if current is None or not current.same_ground(new):
        raise ValueError("the champion's measure is on another split or scorer")
    a, b = getattr(new, metric), getattr(current, metric)
    shown = f"{metric} {a:.4f} vs {b:.4f} on the {new.split} split"
    if better(new, current, metric, mode):
        return Decision(True, f"better than version {current_version}: {shown}")
    if force:
        return Decision(True, f"--force: not better than version {current_version} ({shown})")
    return Decision(False, f"not better than version {current_version}: {shown}")
