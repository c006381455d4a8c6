"""The code of a promoted lorasweep model (MLflow models-from-code: no pickle is logged or loaded).

``orchestrator/registry.py`` logs this file as the model's ``python_model``; MLflow copies it into
the model and runs it on ``mlflow.pyfunc.load_model``. It imports only what the model's pinned
requirements install (mlflow, torch, transformers, peft): never the ``orchestrator`` or ``workers``
packages, which are not published. Everything it needs to know comes from the model's config
(``model_config`` at logging, overridable at loading):

- ``base_model``: the base as the sweep named it (a Hugging Face id, a folder, ``embedded``);
  ``base_revision``: the hub commit it resolved to; ``base_path``: the folder the weights were read
  from on the promoting machine; ``base_sha256``: a hash of those weight files.
- ``chat_template``, ``system_prompt``, ``data_format``, ``user_prefix``: how training rows were
  turned into tokens (the prompt shape), so a prompt is encoded as the adapter learned it.
- ``dtype``, ``max_new_tokens``: generation defaults.

Where the base is read from, first match wins: the environment variable ``LORASWEEP_BASE_MODEL``,
``base_path`` (the recorded one, or ``model_config={"base_path": DIR}`` given to ``load_model``)
if that folder exists here, this machine's lorasweep cache for the embedded model, else the hub
id at its recorded revision. A folder whose weights hash
differs from ``base_sha256`` is refused (another model or version would load silently otherwise).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

BASE_ENV = "LORASWEEP_BASE_MODEL"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_sha256(folder: str | Path) -> str:
    """sha256 over a model folder's weight files (names and bytes, sorted by name); tokenizer
    and config files are left out (re-saving them changes bytes, not the model)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def base_location(config: dict) -> tuple[str, str | None]:
    """(reference for ``from_pretrained``, revision or None) of the base model, checked: a
    folder must hold the weights the adapter was trained on."""
    given = os.environ.get(BASE_ENV)
    recorded = config.get("base_path")
    if given:
        folder, where = Path(given).expanduser(), f"{BASE_ENV}={given}"
    elif recorded and Path(recorded).is_dir():
        folder, where = Path(recorded), recorded
    elif config["base_model"] == "embedded" and recorded and _embedded_here(recorded).is_dir():
        folder = _embedded_here(recorded)  # this machine's lorasweep cache holds the same model
        where = str(folder)
    elif config.get("base_revision") or not _looks_local(config["base_model"]):
        return config["base_model"], config.get("base_revision")
    else:
        raise FileNotFoundError(
            f"base model {config['base_model']!r} (weights sha256 "
            f"{str(config.get('base_sha256'))[:12]}...) is not at {recorded}: set {BASE_ENV} to a "
            "local copy, or load with model_config={'base_path': DIR}"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"base model: {where} is not a model folder (no config.json)")
    want = config.get("base_sha256")
    if want:
        got = weights_sha256(folder)
        if got != want:
            raise ValueError(
                f"base model: the weights at {where} (sha256 {got[:12]}...) are not the ones "
                f"this adapter was trained on ({config['base_model']}, sha256 {want[:12]}...); "
                f"point {BASE_ENV} or model_config base_path at a copy of that model"
            )
    return str(folder), None


def _embedded_here(recorded: str) -> Path:
    """Where lorasweep's cache (``workers/model.py``) keeps the embedded model on this machine."""
    root = Path(os.environ.get("LORASWEEP_CACHE", Path.home() / ".cache" / "lorasweep"))
    return root / "models" / Path(recorded).name


def _looks_local(name: str) -> bool:
    return name == "embedded" or name.startswith((".", "/", "~")) or Path(name).exists()


class LorasweepAdapter(PythonModel):
    """``predict(["user message", ...])`` (or a one-column DataFrame of them) -> completions;
    params ``system_prompt`` and ``max_new_tokens`` override the recorded defaults."""

    def load_context(self, context) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config = dict(context.model_config or {})
        ref, revision = base_location(config)
        kwargs = {"revision": revision} if revision else {}
        self.tokenizer = AutoTokenizer.from_pretrained(ref, **kwargs)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if config.get("chat_template") is not None:  # the template training encoded rows with
            self.tokenizer.chat_template = config["chat_template"]
        dtype = config.get("dtype", "auto")
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        base = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, **kwargs)
        with warnings.catch_warnings():  # peft 0.21 reads a deprecated transformers 5 property
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()

    def _encode(self, prompt: str, system: str | None) -> list[int]:
        """The prompt's tokens exactly as training encoded a row's prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        if self.tokenizer.chat_template:
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant: "
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    # the DataFrame hint keeps MLflow from inferring a schema from hints: the signature logged
    # with the model (a ``prompt`` string column, two params) is the one enforced
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        import torch
        from transformers import GenerationConfig

        params = params or {}
        system = params.get("system_prompt") or self.config.get("system_prompt")
        max_new_tokens = int(params.get("max_new_tokens") or self.config.get("max_new_tokens", 128))
        if isinstance(model_input, str):
            prompts = [model_input]
        elif isinstance(model_input, list):
            prompts = [p["prompt"] if isinstance(p, dict) else p for p in model_input]
        else:  # a DataFrame: the ``prompt`` column (or the first)
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = list(model_input[column])
        tok = self.tokenizer
        greedy = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        out = []
        for prompt in prompts:
            ids = torch.tensor([self._encode(str(prompt), system)])
            with torch.no_grad():
                generated = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy
                )
            out.append(tok.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
        return out


mlflow.models.set_model(LorasweepAdapter())
