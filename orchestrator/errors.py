"""User-facing errors: each names the field or flag and says how to fix it."""

from __future__ import annotations


class LorasweepError(Exception):
    """A user mistake or an environment problem with a known fix; the CLI prints it without a
    traceback and exits non-zero."""


class SpecError(LorasweepError):
    """The sweep spec is invalid. ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class BudgetError(LorasweepError):
    """The budget cannot pay for what was asked."""


class StoreError(LorasweepError):
    """The SQL store failed (after retries where the error was transient). The message is one
    line naming the cause and the store's URL, its password hidden."""
