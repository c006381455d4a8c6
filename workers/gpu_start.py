"""Starting the GPU in the background while the rest of a worker's first setup runs.

A fresh worker process pays, once, for creating the CUDA context and loading cuBLAS (about a
second on the H100) and for importing transformers and PEFT and reading the model (a few seconds,
on the CPU). Done one after the other, both sit in the first trial's billed seconds; the GPU's
part is mostly driver work outside Python, so here it runs in a thread while the main thread
imports and loads. ``wait`` joins it before the model moves to the GPU.

Seeds set before the start are kept: torch queues them and applies them when the context exists.
"""

from __future__ import annotations

import threading

_thread: threading.Thread | None = None
_error: list[BaseException] = []


def _start_cuda() -> None:
    import torch

    try:
        torch.cuda.init()
        x = torch.ones((64, 64), dtype=torch.bfloat16, device="cuda")
        (x @ x).sum().item()  # loads cuBLAS and creates its handle for this device
    except BaseException as exc:  # re-raised in the trial's own thread by ``wait``
        _error.append(exc)


def start(device: str) -> None:
    """Begin starting ``device`` in the background (CUDA only; once per process)."""
    global _thread
    if device != "cuda" or _thread is not None:
        return
    import torch

    if torch.cuda.is_initialized():
        return
    _thread = threading.Thread(target=_start_cuda, name="lorasweep-gpu-start", daemon=True)
    _thread.start()


def wait() -> None:
    """Return once a started GPU is ready; raises what starting it raised."""
    if _thread is not None:
        _thread.join()
    if _error:
        raise _error[0]
