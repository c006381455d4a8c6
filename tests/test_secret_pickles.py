"""Passwords never reach a pickle in Ray's experiment folder: Tune pickles OptunaSearch, which
pickles its study and storage (issue 16, secrets). Real PostgreSQL (its trust auth ignores the
password, so a URL with one still connects) and real OptunaSearch.save."""

from __future__ import annotations

import pickle

import pytest
from _ledger_db import require_pg

from orchestrator.errors import LorasweepError
from orchestrator.optuna_storage import ENV, SecretlessRDBStorage

SECRET = "s3cr3t-pw"


def _url_with_password() -> str:
    scheme, rest = require_pg().split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{SECRET}@{host}"


def test_the_searchers_pickle_holds_no_password(tmp_path, monkeypatch):
    from ray.tune.search.optuna import OptunaSearch

    url = _url_with_password()
    search = OptunaSearch(
        space={"x": __import__("optuna").distributions.FloatDistribution(0, 1)},
        metric="score",
        mode="max",
        storage=SecretlessRDBStorage(url),
        study_name="secret-pickle-test",
    )
    search.save(str(tmp_path / "searcher.pkl"))
    blob = (tmp_path / "searcher.pkl").read_bytes()
    assert SECRET.encode() not in blob
    state = pickle.loads(blob)  # the same process reopens it with its password
    assert state["_ot_study"]._storage._backend.url == url


def test_a_pickle_without_its_password_reopens_only_with_it(monkeypatch):
    from orchestrator import optuna_storage

    url = _url_with_password()
    blob = pickle.dumps(SecretlessRDBStorage(url))
    monkeypatch.setattr(optuna_storage, "_REAL_URLS", {})  # a new process: nothing registered
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(LorasweepError, match="storage.optuna_storage") as err:
        pickle.loads(blob)
    assert SECRET not in str(err.value)
    monkeypatch.setenv(ENV, url)
    assert pickle.loads(blob).url == url
