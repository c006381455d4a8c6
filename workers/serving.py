"""Using a promoted adapter: the MLflow pyfunc wrapper and plain generation.

A registered lorasweep model is a pyfunc whose artifacts are the LoRA adapter (safetensors) and
``lorasweep.json`` (base model reference, dtype, default system prompt). The base model itself is
not copied: it is loaded by reference, exactly like during training.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # device machines run workers without MLflow
    PythonModel = object

META_FILE = "lorasweep.json"


def generate_text(
    tokenizer, model, prompt: str, *, system: str | None = None, max_new_tokens: int = 128
) -> str:
    from workers.data import Example
    from workers.evaluate import generate

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return generate(model, tokenizer, [Example(messages, "")], max_new_tokens)[0]


def load_packaged(model_dir: str | Path):
    """(tokenizer, model, meta) from a downloaded lorasweep model folder."""
    from workers.model import resolve_model
    from workers.scoring import load_with_adapter

    root = Path(model_dir)
    art = root / "artifacts" if (root / "artifacts").is_dir() else root
    meta = json.loads((art / META_FILE).read_text())
    ref = resolve_model(meta["base_model"])
    tokenizer, model = load_with_adapter(ref, art / "adapter", meta.get("dtype", "auto"))
    return tokenizer, model, meta


class AdapterModel(PythonModel):
    """``mlflow.pyfunc.load_model(uri).predict(["prompt", ...])`` -> completions."""

    def load_context(self, context) -> None:
        from workers.model import resolve_model
        from workers.scoring import load_with_adapter

        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        ref = resolve_model(self.meta["base_model"])
        self.tokenizer, self.model = load_with_adapter(
            ref, context.artifacts["adapter"], self.meta.get("dtype", "auto")
        )

    def predict(self, context, model_input, params=None):
        prompts = model_input if isinstance(model_input, list) else list(model_input.iloc[:, 0])
        return [
            generate_text(self.tokenizer, self.model, p, system=self.meta.get("system_prompt"))
            for p in prompts
        ]
