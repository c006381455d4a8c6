"""Checks and estimates made before a cent is spent: data, model, prices, budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.costmodel import CostModel, ModelDims, stored_calibration
from orchestrator.errors import BudgetError, LorasweepError
from orchestrator.memory_check import MemoryFit
from orchestrator.prices import load_catalog, trial_price_usd_per_hour
from orchestrator.spec import SearchSpace, SweepSpec


@dataclass(frozen=True)
class Plan:
    """What the sweep will run with, resolved from the spec."""

    model_ref: str
    train_path: Path
    validation_path: Path
    test_path: Path | None
    price_usd_per_hour: float  # one trial's resources
    cost_model: CostModel
    first_rung_steps: int
    first_rung_evals: int
    baseline_usd: float  # predicted cost of scoring the base model
    memory_fit: MemoryFit | None = None  # GPU runs of Llama-family models only

    def admission_usd(self, measured: dict[str, float], hp: dict) -> float:
        """Predicted cost of a trial with hyperparameters ``hp`` up to its first early-stopping
        rung (what admission reserves)."""
        return self.cost_model.usd(hp, self.first_rung_steps, self.first_rung_evals, measured)

    def trial_usd(self, measured: dict[str, float], hp: dict, steps: int, evals: int) -> float:
        """Predicted cost of ``steps`` training steps and ``evals`` evals of config ``hp``."""
        return self.cost_model.usd(hp, steps, evals, measured)

    def extremes(self, space: SearchSpace) -> tuple[dict, dict]:
        """The cheapest and the dearest config the space can propose (by FLOPs per step)."""
        configs = [
            {"method": m, "rank": r, "target_modules": t}
            for m in space.method.candidates()
            for r in space.rank.candidates()
            for t in space.target_modules.candidates()
        ]
        configs.sort(key=self.cost_model.flops_per_step)
        return configs[0], configs[-1]


def data_paths(spec: SweepSpec) -> tuple[Path, Path, Path | None]:
    if spec.data.source == "embedded":
        from workers.demo_task import split_path

        return split_path("train"), split_path("validation"), split_path("test")
    return spec.data.train, spec.data.validation, spec.data.test


def _check_data(spec: SweepSpec, paths: tuple[Path, Path, Path | None]):
    from workers.data import DataError, read_examples

    out = []
    for field, path in zip(("data.train", "data.validation", "data.test"), paths, strict=True):
        if path is None:
            continue
        try:
            out.append(read_examples(path, spec.data.format, field))
        except DataError as exc:
            raise LorasweepError(str(exc)) from None
    return out[0]


def _model_dims(model_ref: str) -> ModelDims:
    """Sizes for the FLOPs count, from the config alone (model built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_ref)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ModelDims.from_config(config, sum(p.numel() for p in model.parameters()))


def _tokens_per_example(model_ref: str, examples, max_seq_len: int) -> int:
    from workers.data import encode_for_training
    from workers.model import load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    sample = examples[:64]
    lengths = [len(encode_for_training(tokenizer, ex, max_seq_len)[0]) for ex in sample]
    return max(lengths)  # padding makes every row as long as the longest


def _memory_fit(spec: SweepSpec, model_ref: str, catalog) -> MemoryFit | None:
    """The memory check for GPU trials, when the accelerator's memory and the model's shape are
    known (Llama-family configs); None otherwise."""
    from transformers import AutoConfig

    from workers.memory import ModelShape

    row = catalog.get(spec.resources.accelerator)
    if spec.resources.accelerator == "cpu" or row is None or not row.memory_gib:
        return None
    try:
        shape = ModelShape.from_config(AutoConfig.from_pretrained(model_ref))
    except AttributeError:  # not a Llama-shape config: no estimate, no check
        return None
    return MemoryFit(
        shape,
        float(row.memory_gib),
        spec.resources.accelerator,
        spec.trial.batch_size,
        spec.trial.max_seq_len,
    )


def make_plan(spec: SweepSpec) -> Plan:
    """Validate everything a sweep needs and predict costs; raises before any spend."""
    from workers.model import ModelNotFound, check_loadable

    paths = data_paths(spec)
    train = _check_data(spec, paths)
    try:
        model_ref = check_loadable(spec.model.name_or_path)
    except ModelNotFound as exc:
        raise LorasweepError(str(exc)) from None
    catalog = load_catalog(spec.prices.catalog, spec.prices.overrides, spec.prices.market)
    res = spec.resources
    price = trial_price_usd_per_hour(
        catalog, res.accelerator, res.gpus_per_trial, res.cpus_per_trial
    )
    t = spec.trial
    tokens = _tokens_per_example(model_ref, train, t.max_seq_len)
    cost_model = CostModel(
        price_usd_per_hour=price,
        accelerator=res.accelerator,
        units=res.cpus_per_trial if res.accelerator == "cpu" else res.gpus_per_trial,
        dims=_model_dims(model_ref),
        seq_len=tokens,
        batch_size=t.batch_size,
        eval_batches=-(-t.eval_examples // t.batch_size),
        max_new_tokens=t.max_new_tokens,
        dtype=spec.model.dtype,
        compile=t.compile,
        stored=stored_calibration(spec),  # earlier sweeps' measurements price this one
    )
    evals = spec.eval_steps
    if spec.early_stopping.enabled:
        rung = spec.first_rung_reports
        first_steps, first_evals = evals[rung - 1], rung
    else:
        first_steps, first_evals = t.max_steps, len(evals)
    plan = Plan(
        model_ref,
        *paths,
        price_usd_per_hour=price,
        cost_model=cost_model,
        first_rung_steps=first_steps,
        first_rung_evals=first_evals,
        baseline_usd=cost_model.usd({}, 0, 1, {}),
        memory_fit=_memory_fit(spec, model_ref, catalog),
    )
    cheapest, _ = plan.extremes(spec.search_space)
    trial = plan.admission_usd({}, cheapest)
    if plan.baseline_usd + trial > spec.budget_usd:
        raise BudgetError(
            f"budget_usd: ${spec.budget_usd:g} cannot pay for the base-model eval "
            f"(predicted ${plan.baseline_usd:.4f}) and the cheapest trial up to its first rung "
            f"(predicted ${trial:.4f}: {cheapest['method']} rank {cheapest['rank']} "
            f"{cheapest['target_modules']}, at ${price:.4f}/h). Raise budget_usd to at least "
            f"${plan.baseline_usd + trial:.4f} or shrink trial.max_steps / trial.batch_size."
        )
    return plan
