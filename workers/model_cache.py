"""Base-model reuse: a worker process keeps its loaded base model between trials.

Under Ray Tune a function trainable's actor is reused for the next trial with the same resources
(``reuse_actors``, on by default for function trainables), so the process that ran one trial runs
the next. LoRA and QLoRA trials leave the base weights untouched: at the end of a trial training
hooks and gradients are taken off and the model stays here for the next trial of the same model,
dtype and device; only the adapter and the optimizer are new (``workers.lora.attach_lora``
re-initialises the kept adapter of the trial's target set in place, or adds one for a set the
worker has not met; DoRA unloads them all: PEFT ``unload``, no merge).
Compiled decoder layers stay compiled. Full FT changes every weight, so it never uses the cache and
clears it (its memory is needed). One model is kept at a time.

A reused base gives the same results as a fresh load (``tests/test_model_cache.py``).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

_cache: dict[tuple, object] = {}
_held: dict[tuple, object] = {}  # the model of the trial running in this process
stats = {"loads": 0, "reuses": 0}


def hold(key: tuple, model) -> None:
    """Register the running trial's model. Tune stops a trial inside ``tune.report`` (early
    stopping, or the scheduler's last rung), so a trial's code may never reach its own release;
    the next trial in this process then takes the held model back and reuses it."""
    _held.clear()
    _held[key] = model


def acquire(key: tuple, load: Callable[[], object]):
    """The cached base model for ``key``, or a fresh one from ``load()`` (evicting any other)."""
    if _held:
        release(*_held.popitem())  # left by a trial that was stopped: take its base back
    if key in _cache:
        stats["reuses"] += 1
        return _cache.pop(key)
    clear()
    stats["loads"] += 1
    return load()


def release(key: tuple, model) -> None:
    """Take the training state off ``model`` and keep it for the next trial."""
    _held.pop(key, None)
    base = model  # a PEFT model keeps its adapters for the next trial (``workers.lora``)
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    if hasattr(base, "disable_input_require_grads"):
        try:
            base.disable_input_require_grads()
        except AttributeError:  # never enabled: no hook to remove
            pass
    for p in base.parameters():
        p.grad = None
    base.eval()
    _cache.clear()
    _cache[key] = base


def clear() -> None:
    _cache.clear()
    _held.clear()


def return_freed_memory() -> None:
    """Give memory that earlier trials freed back to the OS (glibc). Tune runs each trial's
    function in a new thread, and glibc gives threads their own malloc arenas, which keep what was
    freed in them: without this, a reused CPU worker grew by ~1.2 GB per trial of the goodput
    benchmark until Ray's memory monitor killed it (10 GB after 8 trials)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
