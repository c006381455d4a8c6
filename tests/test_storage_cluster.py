"""Shared storage on a Ray cluster (issue 19), refused at validate time before a cent is spent:
a sweep headed for a cluster (``storage.ray_address``, ``RAY_ADDRESS`` as a Ray Job's driver has
it, ``LORASWEEP_RAY_ADDRESS`` as ``lorasweep serve --ray-address`` sets it) must name
``storage.ray_storage`` (a folder every node mounts at the same absolute path, or an object-store
URI) and must not keep its ledger in a relative sqlite file. On one machine nothing changes.
Also Tune's storage path and the resumed search's state file read through pyarrow's filesystems.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from service_server import run_cli

from orchestrator.errors import SpecError
from orchestrator.spec import parse_spec
from orchestrator.storage_check import check_storage, tune_storage


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
    for key in ("RAY_ADDRESS", "LORASWEEP_RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)


def _spec(tmp_path: Path, **storage):
    storage = {"data_dir": str(tmp_path / "data"), **storage}
    return parse_spec({"name": "s", "budget_usd": 1, "storage": storage}, tmp_path)


def _refusal(spec) -> SpecError:
    with pytest.raises(SpecError) as info:
        check_storage(spec)
    return info.value


def test_one_machine_needs_no_shared_storage(tmp_path):
    spec = _spec(tmp_path)
    check_storage(spec)  # no cluster: the embedded defaults are fine
    assert tune_storage(spec) == str((tmp_path / "data" / "ray").resolve())


def test_a_cluster_sweep_without_shared_tune_storage_is_refused_naming_the_field_and_the_fix(
    tmp_path,
):
    err = _refusal(_spec(tmp_path, ray_address="ray://head:10001"))
    assert err.field == "storage.ray_storage"
    text = str(err)
    assert "ray://head:10001" in text and str(tmp_path / "data" / "ray") in text
    assert "same absolute path" in text and "s3://" in text  # the fix, both ways


def test_the_service_and_a_ray_job_mark_a_sweep_as_a_cluster_one(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    monkeypatch.setenv("LORASWEEP_RAY_ADDRESS", "http://head:8265")  # lorasweep serve
    assert _refusal(spec).field == "storage.ray_storage"
    monkeypatch.delenv("LORASWEEP_RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a Ray Job's driver
    assert _refusal(spec).field == "storage.ray_storage"


def test_a_relative_path_or_an_unknown_scheme_is_refused(tmp_path):
    cluster = {"ray_address": "auto", "service_db": f"sqlite:///{tmp_path / 'ledger.db'}"}
    err = _refusal(_spec(tmp_path, ray_storage="shared/ray", **cluster))
    assert err.field == "storage.ray_storage" and "relative path" in str(err)
    err = _refusal(_spec(tmp_path, ray_storage="ftp://nas/ray", **cluster))
    assert err.field == "storage.ray_storage" and "'ftp'" in str(err)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = _refusal(_spec(tmp_path, ray_storage=str(blocker / "ray"), **cluster))
    assert err.field == "storage.ray_storage" and "is a file" in str(err)


def test_a_shared_folder_or_an_object_store_is_accepted(tmp_path):
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"  # absolute: the same file on shared storage
    shared = tmp_path / "nfs" / "ray"
    spec = _spec(tmp_path, ray_address="auto", ray_storage=str(shared), service_db=ledger)
    check_storage(spec)
    assert tune_storage(spec) == str(shared)
    spec = _spec(
        tmp_path, ray_address="auto", ray_storage="s3://bucket/lorasweep", service_db=ledger
    )
    check_storage(spec)
    assert tune_storage(spec) == "s3://bucket/lorasweep"
    spec = _spec(tmp_path, ray_address="auto", ray_storage=shared.as_uri(), service_db=ledger)
    check_storage(spec)


def test_a_ledger_in_a_relative_sqlite_file_is_refused_on_a_cluster(tmp_path):
    spec = parse_spec(  # data_dir relative: the default ledger URL is sqlite:///lorasweep-data/...
        {
            "name": "s",
            "budget_usd": 1,
            "storage": {"ray_address": "auto", "ray_storage": str(tmp_path / "shared")},
        },
        tmp_path,
    )
    err = _refusal(spec)
    assert err.field == "storage.service_db"
    assert "any node" in str(err) and "postgresql://" in str(err)


def test_lorasweep_validate_refuses_it_before_anything_runs(tmp_path, tiny_model, small_data):
    spec = {
        "name": "clustered",
        "budget_usd": 1,
        "model": {"name_or_path": str(tiny_model)},
        "data": {"source": "files", **{k: str(v) for k, v in small_data.items()}},
        "storage": {"data_dir": str(tmp_path / "data"), "ray_address": "ray://head:10001"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = run_cli(["validate", str(path)], cwd=tmp_path, env={"RAY_ADDRESS": ""})
    out = " ".join(done.stdout.split())
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: storage.ray_storage:" in out and "s3://" in out
    assert not (tmp_path / "data").exists()  # nothing was created


def test_lorasweep_run_with_an_address_refuses_it_before_connecting(
    tmp_path, tiny_model, small_data
):
    spec = {
        "name": "clustered",
        "budget_usd": 1,
        "model": {"name_or_path": str(tiny_model)},
        "data": {"source": "files", **{k: str(v) for k, v in small_data.items()}},
        "storage": {"data_dir": str(tmp_path / "data")},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    # nothing listens at that address: the refusal comes first, before Ray is asked
    done = run_cli(
        ["run", str(path), "--address", "127.0.0.1:1"], cwd=tmp_path, env={"RAY_ADDRESS": ""}
    )
    out = " ".join(done.stdout.split())
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: storage.ray_storage:" in out and "127.0.0.1:1" in out


def test_a_resumed_phase_unfinishes_its_saved_search_through_pyarrow(tmp_path):
    """``lorasweep resume`` clears the 'finished' mark Tune saved with a stopped phase's search;
    the experiment folder is a path or a URI (pyarrow's filesystems) on shared storage."""
    import ray.cloudpickle as cloudpickle

    from orchestrator.sweep import _unfinish_search

    experiment = tmp_path / "shared" / "ray" / "s-1-lora"
    experiment.mkdir(parents=True)
    state = {"finished": True, "name:ConcurrencyLimiter": {"live_trials": {"t1", "t2"}}}
    saved = experiment / "search_gen_state-2026-12-01_15-00-00.json"
    saved.write_bytes(cloudpickle.dumps(state))
    other = experiment / "experiment_state-2026-12-01_15-00-00.json"
    other.write_text("{}")
    _unfinish_search(experiment.as_uri())
    back = cloudpickle.loads(saved.read_bytes())
    assert back["finished"] is False and back["name:ConcurrencyLimiter"]["live_trials"] == set()
    assert other.read_text() == "{}"
    saved.write_bytes(cloudpickle.dumps(state))
    _unfinish_search(str(experiment))  # a plain absolute path, as tune_storage gives
    assert cloudpickle.loads(saved.read_bytes())["finished"] is False
