"""Starting the GPU in the background (``workers.gpu_start``): a no-op off CUDA, and a failed
start surfaces in the trial's own thread. Runs on CPU-only torch, where starting CUDA fails."""

from __future__ import annotations

import pytest
import torch

from workers import gpu_start


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(gpu_start, "_thread", None)
    monkeypatch.setattr(gpu_start, "_error", [])


def test_nothing_starts_off_cuda():
    gpu_start.start("cpu")
    assert gpu_start._thread is None
    gpu_start.wait()  # nothing to wait for


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot start")
def test_a_failed_start_is_raised_by_wait():
    gpu_start.start("cuda")
    assert gpu_start._thread is not None
    with pytest.raises((AssertionError, RuntimeError)):
        gpu_start.wait()
    gpu_start.start("cuda")  # once per process: no second thread
    assert len(gpu_start._error) == 1
