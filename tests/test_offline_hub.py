"""A hub id that cannot be reached fails in about a second, naming the field and the fixes,
instead of after ~26 s of huggingface_hub's retries; ``HF_HUB_OFFLINE`` reads the local cache only.

Each case runs in a fresh interpreter: huggingface_hub reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE``
when it is imported. The time bound is generous (the retries took 26-28 s here); the fix is not
tuned against it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BOUND_S = 10.0

PROBE = """
import json, sys, time
from workers.model import ModelNotFound, check_loadable
t0 = time.monotonic()
try:
    ref, error = check_loadable(sys.argv[1]), None
except ModelNotFound as exc:
    ref, error = None, str(exc)
print(json.dumps({"elapsed_s": time.monotonic() - t0, "ref": ref, "error": error}))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: nothing listens there


def _probe(env: dict, ref: str = HUB_ID) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, ref],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _names_the_fixes(error: str) -> None:
    assert error.startswith("model.name_or_path:")
    assert HUB_ID in error
    for fix in ("local folder", "LORASWEEP_BASE_MODEL", "HF_HUB_OFFLINE"):
        assert fix in error


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param(None, id="this-machine"),  # no route to huggingface.co here (DNS fails)
        pytest.param("closed-port", id="refused"),  # connection refused at once
    ],
)
def test_an_unreachable_hub_fails_fast_naming_the_fix(tmp_path, endpoint):
    env = {"HF_HOME": str(tmp_path / "hf")}
    if endpoint == "closed-port":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    elif _reachable("huggingface.co"):
        pytest.skip("this machine reaches huggingface.co")
    result = _probe(env)
    assert result["ref"] is None
    _names_the_fixes(result["error"])
    assert "no network" in result["error"] or "cannot reach" in result["error"]
    assert result["elapsed_s"] < BOUND_S, result


def test_hf_hub_offline_without_a_cached_copy_fails_fast(tmp_path):
    result = _probe({"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result["ref"] is None
    _names_the_fixes(result["error"])
    assert "HF_HUB_OFFLINE" in result["error"] and "cache" in result["error"]
    assert result["elapsed_s"] < BOUND_S, result


def _cache_copy(hf_home: Path, model_dir: Path, repo: str) -> Path:
    """``model_dir`` laid out as huggingface_hub caches ``repo`` (refs/main -> a snapshot)."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_cached_hub_model_loads_without_network(tmp_path, tiny_model, how):
    hf_home = tmp_path / "hf"
    snapshot = _cache_copy(hf_home, tiny_model, HUB_ID)
    env = {"HF_HOME": str(hf_home)}
    if how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    result = _probe(env)
    assert result["error"] is None
    assert Path(result["ref"]).resolve() == snapshot.resolve()
    assert result["elapsed_s"] < BOUND_S, result


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError:
        return False
    return True
