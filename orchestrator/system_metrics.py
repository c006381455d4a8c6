"""MLflow system metrics of a trial, sampled in the process that trains it (the Ray worker).

The samples carry MLflow's own names (``system/cpu_utilization_percentage``,
``system/gpu_0_utilization_percentage``, ... as ``mlflow.system_metrics`` logs them), so the
trial's run shows them in the UI's "System metrics" tab. They travel with the trial's eval reports
to the driver, the one process that writes to MLflow (``tracking.Tracker.log_trial_result``): a
worker needs neither the tracking server's address nor the child run's id, and an embedded sqlite
store keeps one writer.

Sampled here with psutil (which Ray already imports) and NVML rather than through
``mlflow.system_metrics``' monitors: importing those imports all of mlflow, about 0.9 s of CPU in
every new worker process (measured on 2 cores), which a trial would be billed for (psutil: Ray
imported it already). GPUs need
``pynvml`` (``nvidia-ml-py``, the ``gpu`` extra); without it, or without a GPU, only CPU and
memory are sampled. A sample costs well under a millisecond; one every ``SAMPLE_S`` plus one at
each report is nothing next to a training step, and ``stop`` returns at once (the thread waits on
an event), so the trial's end is not delayed.
"""

from __future__ import annotations

import os
import threading
import time

PREFIX = "system/"
# seconds between samples (MLflow's default is 10): a short CPU trial still gets a few, and each
# report adds one; LORASWEEP_SYSTEM_METRICS_S=0 turns sampling off
SAMPLE_S = float(os.environ.get("LORASWEEP_SYSTEM_METRICS_S", "5"))

Sample = tuple[str, float, int, int]  # (metric key, value, timestamp ms, step)


class SystemSampler:
    """Samples CPU, memory and the trial's GPUs every ``interval_s`` on a daemon thread while
    used as a context manager; :meth:`drain` returns what was sampled since its last call."""

    def __init__(self, interval_s: float = SAMPLE_S) -> None:
        self.interval_s = interval_s
        self._samples: list[Sample] = []
        self._step = 0  # MLflow's system metrics count samples as steps
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpus: list = []  # NVML handles of the GPUs this process may use
        self._cpu_times = None  # the node's CPU times at the previous sample

    def continue_after(self, prior_billed_s: float) -> None:
        """A retried or resumed trial's samples go on after its earlier attempts' in the same run:
        from step 10 x their billed seconds (they sampled far fewer than 10 times a second)."""
        self._step = max(self._step, int(prior_billed_s * 10))

    def __enter__(self) -> SystemSampler:
        if self.interval_s <= 0:
            return self
        try:
            import psutil

            # this sampler's own baseline: psutil.cpu_percent() shares one with any other caller
            # in the process, and a call just before ours makes its window (and reading) ~0
            self._cpu_times = psutil.cpu_times()
        except Exception:  # noqa: BLE001 - no psutil: no system metrics, the trial goes on
            self.interval_s = 0
            return self
        self._gpus = _nvml_handles()
        self._thread = threading.Thread(target=self._run, name="lorasweep-sysmetrics", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        if self._gpus:
            _nvml_shutdown()
            self._gpus = []

    def drain(self) -> list[Sample]:
        """The samples taken since the last drain, with one taken now (while sampling)."""
        if self._thread is not None:
            self.sample()
        with self._lock:
            out, self._samples = self._samples, []
        return out

    def sample(self) -> None:
        """Take one sample of every metric now."""
        with self._lock:  # the thread's and a drain's samples, one at a time
            values = self._cpu_and_memory()
            values.update(_gpu_values(self._gpus))
            now_ms = int(time.time() * 1000)
            self._samples += [(PREFIX + k, float(v), now_ms, self._step) for k, v in values.items()]
            self._step += 1

    def _cpu_and_memory(self) -> dict[str, float]:
        import psutil

        now, before = psutil.cpu_times(), self._cpu_times
        self._cpu_times = now
        busy_s = sum(now) - sum(before) - _idle_s(now) + _idle_s(before)
        total_s = sum(now) - sum(before)
        memory = psutil.virtual_memory()
        return {
            # the node's CPUs since the previous sample (as psutil.cpu_percent, MLflow's reading)
            # clamped: the kernel's iowait counter can go backwards between two readings
            "cpu_utilization_percentage": min(100.0, max(0.0, 100.0 * busy_s / total_s))
            if total_s > 0
            else 0.0,
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.used / memory.total * 100,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a failed sample is skipped, never the trial
                pass


def _idle_s(times) -> float:
    return times.idle + getattr(times, "iowait", 0.0)


def _nvml_handles() -> list:
    """NVML handles of this process's GPUs (``CUDA_VISIBLE_DEVICES``, which Ray sets to the
    trial's, by index or UUID), in CUDA's order; [] without pynvml or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no nvidia-ml-py, no driver, no GPU
        return []
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        handles = []
        for dev in (d.strip() for d in visible.split(",") if d.strip()):
            if dev.isdigit():
                handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(dev)))
            else:
                handles.append(pynvml.nvmlDeviceGetHandleByUUID(dev))
        if not handles:
            _nvml_shutdown()
        return handles
    except Exception:  # noqa: BLE001 - a device NVML cannot name: no GPU metrics
        _nvml_shutdown()
        return []


def _nvml_shutdown() -> None:
    try:
        import pynvml

        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - already shut down
        pass


def _gpu_values(handles: list) -> dict[str, float]:
    """Utilisation, memory and power of each GPU, named as MLflow's GPUMonitor names them."""
    if not handles:
        return {}
    import pynvml

    out: dict[str, float] = {}
    for i, handle in enumerate(handles):
        try:
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out[f"gpu_{i}_memory_usage_percentage"] = memory.used / memory.total * 100
            out[f"gpu_{i}_memory_usage_megabytes"] = memory.used / 1e6
            out[f"gpu_{i}_utilization_percentage"] = pynvml.nvmlDeviceGetUtilizationRates(
                handle
            ).gpu
            power_mw = pynvml.nvmlDeviceGetPowerUsage(handle)
            out[f"gpu_{i}_power_usage_watts"] = power_mw / 1000
            limit_mw = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)
            out[f"gpu_{i}_power_usage_percentage"] = power_mw / limit_mw * 100
        except Exception:  # noqa: BLE001 - what this GPU does not report is left out
            continue
    return out
