"""A worker's bill starts with its process when Ray started it for the lease (workers/held.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from workers import held

ROOT = Path(__file__).resolve().parents[1]


def test_a_young_process_is_held_since_its_start():
    code = (
        "import time; from workers.held import held_since; t = time.monotonic(); "
        "print(t - held_since(t))"
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    wall_s = time.monotonic() - start
    before_load_s = float(out.stdout)
    # its interpreter's start-up counts (more than nothing), and no more than the child lived
    assert 0.0 < before_load_s <= wall_s + 0.05


def test_an_old_process_is_held_since_our_code_loaded(monkeypatch):
    monkeypatch.setattr(held, "process_age_s", lambda: 10 * held.FRESH_WORKER_S)
    loaded = time.monotonic()
    assert held.held_since(loaded) == loaded
