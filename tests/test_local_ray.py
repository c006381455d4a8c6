"""A sweep without a cluster address starts a local Ray of its own. ``ray.init()`` without an
address joins the cluster whose address the last ``ray start`` of the machine left in Ray's temp
folder, even one long dead, and then refuses the local cluster's ``num_cpus``: after a
``ray start --head`` on this machine was stopped by PID, every later sweep and Ray test failed
with "When connecting to an existing cluster, num_cpus and num_gpus must not be provided".
Real Ray, in a child process whose Ray temp folder holds such a stale address."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from test_sweep_e2e import _spec

ROOT = Path(__file__).resolve().parents[1]
START = """
import sys
import ray
from orchestrator.spec import load_spec
from orchestrator.sweep import _init_ray
_init_ray(load_spec(sys.argv[1]), None)
print("cpus", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def test_a_local_sweep_starts_its_own_ray_beside_a_dead_clusters_address(
    tmp_path, tiny_model, small_data
):
    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=1.0, max_trials=1)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw.model_dump(mode="json")))
    # short: Ray's socket paths under it must stay within the OS's limit
    temp_root = Path(tempfile.mkdtemp(prefix="lsray", dir="/tmp"))
    try:
        (temp_root / "ray").mkdir()
        (temp_root / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nobody there
        env = {**os.environ, "RAY_TMPDIR": str(temp_root), "RAY_ADDRESS": ""}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        out = subprocess.run(
            [sys.executable, "-c", START, str(spec_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"cpus {float(os.cpu_count())}" in out.stdout, out.stdout
