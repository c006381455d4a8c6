"""Checks and estimates made before a cent is spent: data, model, prices, budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from orchestrator.costmodel import CostModel, ModelDims, stored_calibration
from orchestrator.errors import BudgetError, LorasweepError
from orchestrator.memory_check import MemoryFit
from orchestrator.pack_plan import PackChoice, choose_pack
from orchestrator.prices import load_catalog, trial_price_usd_per_hour
from orchestrator.spec import SearchSpace, SweepSpec
from orchestrator.storage_check import check_storage


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
    # the pack the LoRA phase runs (resources.pack_slots, auto resolved); None: unpacked
    pack: PackChoice | None = None
    # what the ledger keeps free beside each running trial's ceiling (the watchdog's margin,
    # orchestrator/watchdog.py): admission needs ceiling + allowance under the cap
    allowance_usd: float = 0.0
    # rows by spec field (``data.train``, ...)
    row_counts: dict[str, int] = dataclass_field(default_factory=dict)

    def admission_usd(self, measured: dict[str, float], hp: dict) -> float:
        """Predicted cost of a trial with hyperparameters ``hp`` up to its first early-stopping
        rung (what admission reserves)."""
        return self.cost_model.usd(hp, self.first_rung_steps, self.first_rung_evals, measured)

    def trial_usd(self, measured: dict[str, float], hp: dict, steps: int, evals: int) -> float:
        """Predicted cost of ``steps`` training steps and ``evals`` evals of config ``hp``."""
        return self.cost_model.usd(hp, steps, evals, measured)

    def least_budget_usd(self, space: SearchSpace) -> float:
        """The least ``budget_usd`` that runs: the base-model eval and the space's cheapest
        trial up to its first rung, with the allowance the ledger keeps beside a running one.
        ``make_plan`` refuses any budget below it, so this is what ``run`` accepts."""
        cheapest, _ = self.extremes(space)
        return self.baseline_usd + self.admission_usd({}, cheapest) + self.allowance_usd

    def full_trial_budget_usd(self, hp: dict, max_steps: int, evals: int) -> float:
        """The least ``budget_usd`` that pays the base-model eval and one full trial of ``hp``."""
        return self.baseline_usd + self.trial_usd({}, hp, max_steps, evals) + self.allowance_usd

    def buys(self, budget_usd: float, hp: dict, max_steps: int, evals: int) -> tuple[int, int]:
        """(trials to the first rung, full trials) of config ``hp`` that ``budget_usd`` pays
        one after another after the base-model eval, by the predictions admission reserves."""
        room = budget_usd - self.baseline_usd - self.allowance_usd
        if room <= 0:
            return 0, 0
        to_rung = int(room // self.admission_usd({}, hp))
        return to_rung, int(room // self.trial_usd({}, hp, max_steps, evals))

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


DATA_FIELDS = ("data.train", "data.validation", "data.test")


def usd_up(usd: float) -> str:
    """Dollars rounded up to a millionth: a budget of the printed figure is enough."""
    up = math.ceil(usd * 1e6) / 1e6
    return f"${up + 1e-6 if up < usd else up:.6f}"  # a float product may round below


def _check_data(spec: SweepSpec, paths: tuple[Path, Path, Path | None]) -> dict[str, list]:
    """Every row of every data file, read and checked; by spec field."""
    from workers.data import DataError, read_examples

    out = {}
    for field, path in zip(DATA_FIELDS, paths, strict=True):
        if path is None:
            continue
        try:
            out[field] = read_examples(path, spec.data.format, field)
        except DataError as exc:
            raise LorasweepError(str(exc)) from None
    return out


def _meta_model(model_ref: str):
    """The model's config and the model built from it on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_ref)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model


def _model_dims(config, model) -> ModelDims:
    """Sizes for the FLOPs count, from the config and the meta-device model."""
    return ModelDims.from_config(config, sum(p.numel() for p in model.parameters()))


def target_sets_of(model) -> list[str]:
    """The named target-module sets (``workers.lora.TARGET_MODULES``) ``model`` has: a set of
    module names needs every one of them (as the worker's attach does), ``all_linear`` needs a
    linear layer other than the output head."""
    from workers.lora import TARGET_MODULES

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    linear = any(
        type(m).__name__ in ("Linear", "Conv1D") and m is not model.get_output_embeddings()
        for m in model.modules()
    )
    return [
        key
        for key, targets in TARGET_MODULES.items()
        if (linear if isinstance(targets, str) else set(targets) <= names)
    ]


def available_target_sets(model_ref: str) -> list[str]:
    """The target-module sets the model at ``model_ref`` has (built on the meta device)."""
    return target_sets_of(_meta_model(model_ref)[1])


def _check_target_modules(spec: SweepSpec, model) -> None:
    """Refuse a search space that can propose target modules the model lacks (named sets and
    raw module lists), so TPE never proposes them."""
    from orchestrator.targets import check_target_modules

    check_target_modules(spec.search_space, model)


def _check_room(spec: SweepSpec, model_ref: str, paths, rows: dict[str, list]) -> int:
    """Every training row, and every validation row scored, fits ``trial.max_seq_len`` (or is
    left-truncated, ``data.truncation: left``); returns the tokens per example the cost model
    uses (the longest of the first 64 training rows: padding makes a batch as long as its
    longest row)."""
    from workers.data import DataError, check_room
    from workers.model import load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    t, truncation = spec.trial, spec.data.truncation
    try:
        lengths = check_room(
            tokenizer, rows["data.train"], "data.train", paths[0], t.max_seq_len, truncation
        )
        scored = rows["data.validation"][: t.eval_examples]
        check_room(
            tokenizer,
            scored,
            "data.validation",
            paths[1],
            t.max_seq_len,
            truncation,
            new_tokens=t.max_new_tokens,
        )
    except DataError as exc:
        raise LorasweepError(str(exc)) from None
    return max(lengths[:64])


def _tokens_per_example(
    model_ref: str, examples, max_seq_len: int, truncation: str = "refuse"
) -> int:
    """The longest of the first 64 examples as training encodes them (for the cost model)."""
    from workers.data import encode_for_training
    from workers.model import load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    sample = examples[:64]
    lengths = [len(encode_for_training(tokenizer, ex, max_seq_len, truncation)[0]) for ex in sample]
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
    from orchestrator.watchdog import allowance_usd
    from workers.model import ModelNotFound, check_loadable

    check_storage(spec)
    paths = data_paths(spec)
    rows = _check_data(spec, paths)
    try:
        model_ref = check_loadable(spec.model.name_or_path)
    except ModelNotFound as exc:
        raise LorasweepError(str(exc)) from None
    config, meta_model = _meta_model(model_ref)
    _check_target_modules(spec, meta_model)
    catalog = load_catalog(spec.prices.catalog, spec.prices.overrides, spec.prices.market)
    res = spec.resources
    price = trial_price_usd_per_hour(
        catalog, res.accelerator, res.gpus_per_trial, res.cpus_per_trial
    )
    memory_fit = _memory_fit(spec, model_ref, catalog)
    pack = choose_pack(spec, memory_fit)  # an explicit K that does not fit is refused here
    t = spec.trial
    tokens = _check_room(spec, model_ref, paths, rows)
    cost_model = CostModel(
        price_usd_per_hour=price,
        accelerator=res.accelerator,
        units=res.cpus_per_trial if res.accelerator == "cpu" else res.gpus_per_trial,
        dims=_model_dims(config, meta_model),
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
        memory_fit=memory_fit,
        pack=pack,
        allowance_usd=allowance_usd(price),
        row_counts={k: len(v) for k, v in rows.items()},
    )
    least = plan.least_budget_usd(spec.search_space)
    if least > spec.budget_usd:
        cheapest, _ = plan.extremes(spec.search_space)
        raise BudgetError(
            f"budget_usd: ${spec.budget_usd:g} cannot pay for the base-model eval "
            f"(predicted ${plan.baseline_usd:.6f}), the cheapest trial up to its first rung "
            f"(predicted ${plan.admission_usd({}, cheapest):.6f}: {cheapest['method']} rank "
            f"{cheapest['rank']} {cheapest['target_modules']}, at ${price:.4f}/h) and the "
            f"watchdog's allowance beside it (${plan.allowance_usd:.6f}). Raise budget_usd to at "
            f"least {usd_up(least)} or shrink trial.max_steps / trial.batch_size."
        )
    return plan
