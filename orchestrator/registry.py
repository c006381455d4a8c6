"""Promotion: register the best trial's adapter in the MLflow Model Registry with alias champion."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator import leaderboard
from orchestrator.errors import LorasweepError
from orchestrator.spec import SweepSpec

ALIAS = "champion"


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    score: float
    cost_usd: float
    test_score: float | None


def _sweep_spec(client, parent_run_id: str) -> SweepSpec:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent_run_id, "spec.yaml", tmp)
        return SweepSpec.model_validate(yaml.safe_load(Path(path).read_text()))


def _system_prompt(train_path: Path, fmt: str) -> str | None:
    from workers.data import read_examples

    first = read_examples(train_path, fmt)[0].prompt
    return first[0]["content"] if first and first[0]["role"] == "system" else None


def promote(
    tracking_uri: str, sweep: str | None, name: str | None = None, score_test: bool = True
) -> Promotion:
    """Register the best trial of ``sweep`` as a new version of ``name`` (default: the spec's
    name) and point the alias ``champion`` at it. Scores the test split when the data has one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from orchestrator.preflight import data_paths
    from workers.model import resolve_model
    from workers.scoring import score_split
    from workers.serving import META_FILE, AdapterModel

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = leaderboard.find_sweep(tracking_uri, sweep)
    best = leaderboard.best_row(leaderboard.trial_rows(tracking_uri, parent))
    if best is None:
        raise LorasweepError(f"SWEEP: {parent.info.run_name} has no scored trial to promote")
    spec = _sweep_spec(client, parent.info.run_id)
    name = name or spec.name
    _, _, test_path = data_paths(spec)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = client.download_artifacts(best.run_id, "adapter", tmp)
        meta_path = Path(tmp) / META_FILE
        meta_path.write_text(
            json.dumps(
                {
                    "base_model": spec.model.name_or_path,
                    "dtype": spec.model.dtype,
                    "system_prompt": _system_prompt(data_paths(spec)[0], spec.data.format),
                    "sweep_id": parent.info.run_name,
                    "trial_run_id": best.run_id,
                }
            )
        )
        test_score = None
        if score_test and test_path is not None and Path(test_path).is_file():
            t = spec.trial
            test = score_split(
                resolve_model(spec.model.name_or_path),
                test_path,
                adapter_dir=adapter,
                data_format=spec.data.format,
                field="data.test",
                max_new_tokens=t.max_new_tokens,
                max_seq_len=t.max_seq_len,
                batch_size=t.batch_size,
                dtype=spec.model.dtype,
            )
            test_score = test["score"]
            client.log_metric(best.run_id, "test_score", test_score)
        with mlflow.start_run(run_id=best.run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=AdapterModel(),
                artifacts={"adapter": adapter, "meta": str(meta_path)},
                pip_requirements=["lorasweep", "torch", "transformers", "peft"],
                registered_model_name=name,
            )
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, ALIAS, version)
    tags = {
        "base_model": spec.model.name_or_path,
        "sweep": parent.info.run_name,
        "score": f"{best.score:.4f}",
        "cost_usd": f"{best.cost_usd:.6f}",
        "trial": best.trial,
    }
    if test_score is not None:
        tags["test_score"] = f"{test_score:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return Promotion(name, version, best.run_id, best.score, best.cost_usd, test_score)


def generate(
    tracking_uri: str,
    model_uri: str,
    prompt: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
) -> str:
    """Load base + adapter from ``models:/NAME@champion`` (or any model URI) and complete."""
    import mlflow

    from workers.serving import generate_text, load_packaged

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad URI
        raise LorasweepError(
            f"--model: cannot load {model_uri!r} from {tracking_uri} "
            f"({type(exc).__name__}); promote a sweep first or fix the URI"
        ) from None
    tokenizer, model, meta = load_packaged(local)
    return generate_text(
        tokenizer,
        model,
        prompt,
        system=system or meta.get("system_prompt"),
        max_new_tokens=max_new_tokens,
    )
