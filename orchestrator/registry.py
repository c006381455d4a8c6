"""Promotion: register a sweep's best adapter in the MLflow Model Registry; ``champion`` moves to
it only when it beats the current champion on the same split and scorer (or with ``force``).

The registered model is MLflow models-from-code (``orchestrator/model_code.py``, no pickle) with
requirements pinned to what is installed here, the base model recorded as hub id + revision or a
content hash of its weight files, and the prompt shape of the sweep's data (chat template, system
prompt, an input example from the validation split, a signature). Promotion writes nothing to the
trial's run: the scores it measures go on the model version.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator import leaderboard
from orchestrator.champion import ALIAS, CHALLENGER, SCORER, Decision, Measure, decide, file_sha256
from orchestrator.errors import LorasweepError
from orchestrator.prompt_shape import PromptShape, prompt_shape
from orchestrator.spec import SweepSpec

__all__ = ["ALIAS", "Promotion", "promote", "generate", "pinned_requirements"]

MODEL_CODE = Path(__file__).with_name("model_code.py")
# what model_code.py imports, and what those need at load (jinja2: chat templates)
REQUIREMENTS = (
    "mlflow",
    "torch",
    "transformers",
    "peft",
    "pandas",
    "safetensors",
    "tokenizers",
    "jinja2",
)
DEFAULT_MAX_NEW_TOKENS = 128  # ``lorasweep generate``'s default; at least the eval's


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    score: float
    cost_usd: float
    test_score: float | None
    alias: str = ALIAS  # champion, or challenger when it did not beat the champion
    eval_loss: float | None = None  # validation, of the adapter registered
    champion_version: str = ""  # where champion points after this promotion
    replaced: str | None = None  # the version champion pointed at before, when it moved
    reason: str = ""
    trial: str = ""
    best_step: int | None = None
    objective: str = "score"
    shape: PromptShape | None = None
    base: str = ""  # how the base model is pinned: id@revision or sha256


def pinned_requirements() -> list[str]:
    """``pkg==version`` of what is installed here for each package the model code needs; a
    local version label (torch's ``+cpu``) is dropped: PyPI serves the same release under the
    plain version."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return out


def base_record(name_or_path: str, ref: str) -> dict:
    """The base model as the model config records it: the sweep's name, the folder read here,
    and a hash of its weights (a local folder) or the hub revision it resolved to (an id)."""
    from orchestrator.model_code import weights_sha256

    record = {"base_model": name_or_path, "base_path": None, "base_revision": None}
    record["base_sha256"] = None
    local = Path(ref)
    if local.is_dir():
        record["base_path"] = str(local.resolve())
        record["base_sha256"] = weights_sha256(local)
        return record
    from transformers import AutoConfig

    record["base_revision"] = getattr(AutoConfig.from_pretrained(ref), "_commit_hash", None)
    try:  # the hub snapshot this machine has: hashed too, so a copy elsewhere can be checked
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(ref, revision=record["base_revision"], local_files_only=True)
        record["base_sha256"] = weights_sha256(snapshot)
    except Exception:  # noqa: BLE001 - not cached here as a snapshot: the revision pins it
        pass
    return record


def _pin(record: dict) -> str:
    if record["base_revision"]:
        return f"{record['base_model']}@{record['base_revision']}"
    if record["base_sha256"]:
        return f"{record['base_model']} (weights sha256 {record['base_sha256'][:12]}...)"
    return f"{record['base_model']} (unpinned: no revision or local weights found)"


def _sweep_spec(client, parent_run_id: str) -> SweepSpec:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent_run_id, "spec.yaml", tmp)
        return SweepSpec.model_validate(yaml.safe_load(Path(path).read_text()))


def _measure(spec: SweepSpec, ref: str, split: str, path: Path, adapter) -> Measure:
    from workers.scoring import score_split

    t = spec.trial
    result = score_split(
        ref,
        path,
        adapter_dir=adapter,
        data_format=spec.data.format,
        field=f"data.{split}",
        max_new_tokens=t.max_new_tokens,
        max_seq_len=t.max_seq_len,
        batch_size=t.batch_size,
        dtype=spec.model.dtype,
    )
    return Measure(split, file_sha256(path), SCORER, result["score"], result["eval_loss"])


def _champion(client, name: str):
    """The version ``champion`` points at, or None (no such model, or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def _champion_measure(spec, version, new: Measure, path: Path) -> Measure:
    """The champion, measured elsewhere (another split, scorer, or before these records),
    scored again here on the new version's split (its base model must be loadable here)."""
    import mlflow

    from workers.model import resolve_model

    try:
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"models:/{version.name}/{version.version}"
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
            adapter = local / "artifacts" / "adapter"
            ref = resolve_model(version.tags["base_model"])
            return _measure(spec, ref, new.split, path, adapter)
    except Exception as exc:  # noqa: BLE001 - named, with the way out
        raise LorasweepError(
            f"promote: champion version {version.version} of {version.name} was measured on "
            f"another split or scorer and cannot be scored on this {new.split} split here "
            f"({type(exc).__name__}: {exc}); give --force to move champion without comparing"
        ) from None


def _signature(shape: PromptShape, max_new_tokens: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: predict(["a prompt", ...]) as is
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("system_prompt", "string", shape.system_prompt or ""),
                ParamSpec("max_new_tokens", "long", max_new_tokens),
            ]
        ),
    )


def _register(client, name: str, model_info, run_id: str, tags: dict):
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "ALREADY_EXISTS" not in exc.error_code:
            raise
    # run_id links the version to the trial in the UI; the trial's run itself is not touched
    return client.create_model_version(
        name, model_info.model_uri, run_id=run_id, tags=tags, model_id=model_info.model_id
    )


def known_sweeps(tracking_uri: str) -> str:
    runs = leaderboard.sweep_runs(tracking_uri, max_results=10)
    return ", ".join(r.info.run_name for r in runs) or "none yet (run `lorasweep run`)"


# peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` on every adapter load:
# a FutureWarning about neither our code nor the user's
PEFT_DEPRECATION = r".*`is_gradient_checkpointing` is deprecated.*"


@contextlib.contextmanager
def _quiet():
    """Promotion's output without the libraries' noise: that known deprecation and the progress
    bars of artifact downloads and weight loading (several per promotion)."""
    import transformers

    bars = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
            yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()
        if bars is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bars


def promote(
    tracking_uri: str, sweep: str | None, name: str | None = None, *, force: bool = False
) -> Promotion:
    """Register the best trial of ``sweep`` (a sweep id, or a spec name for its latest sweep;
    required) as a new version of ``name`` (default: the spec's name). ``champion`` moves to it
    when it beats the current one by the sweep's objective on the same split (test when the data
    has one, else validation) and scorer, or with ``force``; otherwise the new version gets the
    alias ``challenger`` and ``champion`` stays."""
    with _quiet():
        return _promote(tracking_uri, sweep, name, force)


def _promote(tracking_uri: str, sweep: str | None, name: str | None, force: bool) -> Promotion:
    import mlflow
    from mlflow.tracking import MlflowClient

    from orchestrator.preflight import data_paths
    from workers.model import load_tokenizer, resolve_model

    if not sweep:  # the latest sweep of whatever experiment would be a guess
        raise LorasweepError(
            "SWEEP: say which sweep to promote (a sweep id, or a spec name for its latest "
            f"sweep); known: {known_sweeps(tracking_uri)}"
        )
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = leaderboard.find_sweep(tracking_uri, sweep)
    metric, mode = leaderboard.objective(parent)
    best = leaderboard.best_row(leaderboard.trial_rows(tracking_uri, parent))
    if best is None:
        raise LorasweepError(f"SWEEP: {parent.info.run_name} has no scored trial to promote")
    spec = _sweep_spec(client, parent.info.run_id)
    name = name or spec.name
    train_path, val_path, test_path = data_paths(spec)
    ref = resolve_model(spec.model.name_or_path)
    base = base_record(spec.model.name_or_path, ref)
    shape = prompt_shape(train_path, val_path, spec.data.format, load_tokenizer(ref))
    has_test = test_path is not None and Path(test_path).is_file()
    split, split_path = ("test", Path(test_path)) if has_test else ("validation", Path(val_path))
    max_new_tokens = max(DEFAULT_MAX_NEW_TOKENS, spec.trial.max_new_tokens)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = client.download_artifacts(best.run_id, "adapter", tmp)
        new = _measure(spec, ref, split, split_path, adapter)
        current = _champion(client, name)
        if current is None:
            decision = decide(new, None, None, metric, mode)
        else:
            recorded = Measure.from_tags(current.tags)
            if recorded is not None and recorded.same_ground(new):
                on_ground = recorded
            elif force:  # no comparison asked for: the champion is not scored again
                on_ground = None
            else:
                on_ground = _champion_measure(spec, current, new, split_path)
            decision = (
                Decision(True, f"--force: replaces version {current.version} (not compared)")
                if on_ground is None
                else decide(new, current.version, on_ground, metric, mode, force)
            )
        config = {
            **base,
            **shape.as_config(),
            "dtype": spec.model.dtype,
            "max_new_tokens": max_new_tokens,
        }
        mlflow.set_experiment(experiment_id=parent.info.experiment_id)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"adapter": adapter},
            model_config=config,
            pip_requirements=pinned_requirements(),
            signature=_signature(shape, max_new_tokens),
            input_example=[shape.input_example],
        )
    tags = {
        "base_model": spec.model.name_or_path,
        "base_revision": base["base_revision"] or "",
        "base_sha256": base["base_sha256"] or "",
        "sweep": parent.info.run_name,
        "trial": best.trial,
        "trial_run_id": best.run_id,
        "best_step": "" if best.best_step is None else str(best.best_step),
        "objective": f"{metric} {mode}",
        "score": f"{best.score:.4f}",  # validation, the trial's own eval of this adapter
        "eval_loss": "" if best.eval_loss is None else f"{best.eval_loss:.4f}",
        "cost_usd": f"{best.cost_usd:.6f}",
        **new.tags(),
    }
    if has_test:
        tags["test_score"] = f"{new.score:.4f}"
        tags["test_eval_loss"] = f"{new.eval_loss:.4f}"
    version = str(_register(client, name, info, best.run_id, tags).version)
    if decision.move:
        client.set_registered_model_alias(name, ALIAS, version)
        if current is not None and current.version != version:
            client.set_model_version_tag(name, version, "replaced_version", str(current.version))
        champion_version, alias = version, ALIAS
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
        champion_version, alias = str(current.version), CHALLENGER
    return Promotion(
        name,
        version,
        best.run_id,
        best.score,
        best.cost_usd,
        new.score if has_test else None,
        alias=alias,
        eval_loss=best.eval_loss,
        champion_version=champion_version,
        replaced=str(current.version) if decision.move and current is not None else None,
        reason=decision.reason,
        trial=best.trial,
        best_step=best.best_step,
        objective=f"{metric} {mode}",
        shape=shape,
        base=_pin(base),
    )


def generate(
    tracking_uri: str,
    model_uri: str,
    prompt: str,
    *,
    system: str | None = None,
    max_new_tokens: int | None = None,
) -> str:
    """Complete ``prompt`` with a registered model (``models:/NAME@champion`` or any model URI),
    loaded the way plain MLflow loads it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad URI
        detail = str(exc).splitlines()[0][:1000] if str(exc) else type(exc).__name__
        if re.search(r"base model", detail):  # our own refusal (model_code.py): say it as is
            raise LorasweepError(f"--model: {detail}") from None
        raise LorasweepError(
            f"--model: cannot load {model_uri!r} from {tracking_uri} "
            f"({type(exc).__name__}); promote a sweep first or fix the URI"
        ) from None
    params = {}
    if system:
        params["system_prompt"] = system
    if max_new_tokens:
        params["max_new_tokens"] = max_new_tokens
    return model.predict([prompt], params=params or None)[0]
