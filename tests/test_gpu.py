"""GPU tests (CUDA only; deselected by default). Run on a GPU machine:

    python -m pytest -m gpu tests/test_gpu.py

They run the worker's own loop for lora, qlora and full on a Llama-shape model and check the
memory estimator against ``torch.cuda.max_memory_allocated`` (the full table comes from
``bench/memory_estimate.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
memory_bench = pytest.importorskip("memory_estimate")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    return memory_bench._prepare(tmp_path_factory.mktemp("gpu"), "llama-0.5b")


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_worker_loop_runs_and_memory_estimate_is_within_20_percent(model_and_data, method):
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("qlora needs bitsandbytes")
    model_dir, data = model_and_data
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = memory_bench.measure_one(str(model_dir), str(data), method, 4, 512, False, 16, "all_linear")
    assert r["measured_gib"] > r["static_gib"] > 0
    assert abs(r["predicted_gib"] / r["measured_gib"] - 1) <= 0.20
