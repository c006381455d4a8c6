"""Optuna's SQL storage, picklable without its password.

Tune pickles its searcher into the experiment folder (``OptunaSearch.save`` pickles the study,
which pickles its ``RDBStorage``, URL and all). This storage pickles its URL with the password
hidden; unpickled in a process that opened the same storage (the driver), it finds the real URL
again in this module's registry, else in ``LORASWEEP_OPTUNA_STORAGE`` (how a restarted driver
passes it in), and refuses to connect otherwise.
"""

from __future__ import annotations

import os

from optuna.storages import RDBStorage

from orchestrator.errors import LorasweepError
from orchestrator.secrets import hide_password

ENV = "LORASWEEP_OPTUNA_STORAGE"
_REAL_URLS: dict[str, str] = {}  # hidden URL -> real URL, for storages opened in this process


class SecretlessRDBStorage(RDBStorage):
    """An ``RDBStorage`` whose pickles hold no password."""

    def __init__(self, url: str, **kwargs) -> None:
        _REAL_URLS[hide_password(url)] = url
        super().__init__(url, **kwargs)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["url"] = hide_password(self.url)
        return state

    def __setstate__(self, state: dict) -> None:
        hidden = state["url"]
        real = _REAL_URLS.get(hidden) or os.environ.get(ENV)
        if real is None or hide_password(real) != hidden:
            raise LorasweepError(
                f"storage.optuna_storage: {hidden} was saved without its password; set {ENV} "
                "to the full URL to reopen it"
            )
        super().__setstate__({**state, "url": real})
