"""The sweep spec: one YAML file, validated by these pydantic models.

Every model forbids unknown keys, so a typo fails loudly with the key's dotted path. Numbers
must be finite (no YAML ``.nan`` / ``.inf``) and are never booleans (YAML reads ``yes``/``no``/
``on``/``off`` as true/false, which pydantic would otherwise take for 1 and 0). A key given twice
in the YAML is refused, naming its path. Relative paths inside a spec are resolved against the
spec file's folder.

Every field has a ``description``: ``docs/spec-reference.md`` is generated from them
(``python -m orchestrator.spec_reference``), and errors point there.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from orchestrator.errors import SpecError
from workers.train import HYPERPARAMETERS  # noqa: F401 - re-exported for the control plane

EMBEDDED_MODEL = "embedded"
TARGET_MODULE_SETS = ("qv", "attn", "mlp", "attn_mlp", "all_linear")
METHODS = ("lora", "qlora", "full")
PRESETS_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
EXAMPLE_SPEC = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
NAME_MAX_CHARS = 64  # a sweep's name goes into folder names, MLflow experiments and SQL rows
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)
# every key with its type, default and meaning (generated: python -m orchestrator.spec_reference)
SPEC_REFERENCE = "docs/spec-reference.md"
URL_FIELDS = ("mlflow_tracking_uri", "optuna_storage", "service_db", "ray_address", "ray_storage")
NOT_A_BOOL = "not true/false (YAML reads yes/no/on/off as booleans)"


def _no_bool(v: Any) -> Any:
    """Refuse a boolean where a number goes (pydantic's lax mode would read true as 1)."""
    if isinstance(v, bool):
        raise ValueError(f"must be a number, {NOT_A_BOOL}")
    return v


Num = Annotated[float, BeforeValidator(_no_bool)]  # finite: the models set allow_inf_nan=False
Int = Annotated[int, BeforeValidator(_no_bool)]


def _is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Dim(_Strict):
    """One search dimension: a fixed ``value``, a list of ``choices``, or a ``low``..``high`` range
    (``log: true`` samples log-uniformly)."""

    value: Any = Field(None, description="the one value every trial gets (not searched)")
    choices: list[Any] | None = Field(None, description="values the search picks among")
    low: Num | None = Field(None, description="lower end of a searched range (with `high`)")
    high: Num | None = Field(None, description="upper end of a searched range (with `low`)")
    log: bool = Field(False, description="sample the range log-uniformly (needs low > 0)")

    @model_validator(mode="before")
    @classmethod
    def _scalar_is_value(cls, data: Any) -> Any:
        return data if isinstance(data, dict) else {"value": data}  # `rank: 16` == {value: 16}

    @model_validator(mode="after")
    def _one_form(self) -> Dim:
        forms = [
            self.value is not None,
            self.choices is not None,
            self.low is not None or self.high is not None,
        ]
        if sum(forms) != 1:
            raise ValueError("give exactly one of `value`, `choices`, or `low` + `high`")
        if forms[1] and not self.choices:
            raise ValueError("`choices` must list at least one value")
        if forms[2]:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError("a range needs both `low` and `high` with low < high")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
        if any(isinstance(v, float) and not math.isfinite(v) for v in self.candidates()):
            raise ValueError("every value must be a finite number (not .nan or .inf)")
        return self

    def candidates(self) -> list[Any]:
        """Values this dimension can take (range endpoints for ranges)."""
        if self.value is not None:
            return [self.value]
        if self.choices is not None:
            return list(self.choices)
        return [self.low, self.high]


def config_label(hp: dict) -> str:
    """A short name for a config's cost-relevant choices: ``lora r16 all_linear``, ``full FT``."""
    if hp.get("method") == "full":
        return "full FT"
    return f"{hp.get('method', 'lora')} r{hp.get('rank')} {hp.get('target_modules')}"


def _positive_values(dim: Dim) -> Dim:
    """``dim`` if every value it can take is a finite number > 0."""
    if any(not _is_number(v) or v <= 0 for v in dim.candidates()):
        raise ValueError(f"every value must be a number > 0, {NOT_A_BOOL}")
    return dim


class SearchSpace(_Strict):
    """What Optuna searches. Start from a ``preset`` (a file in ``search_spaces/``); keys given
    here override the preset's."""

    preset: str | None = Field(
        None,
        description="light | medium | heavy | default: a file in search_spaces/ whose keys this "
        "section overrides; a spec without search_space gets `default`",
    )
    method: Dim = Field(
        Dim(value="lora"),
        description="lora | qlora (CUDA GPU, bitsandbytes) | full, fixed or searched",
    )
    learning_rate: Dim = Field(
        Dim(low=1e-4, high=1e-2, log=True),
        description="LoRA learning rate, > 0; matters most: search it log-uniformly about a "
        "decade either side of ~1e-3 (1-4B models)",
    )
    rank: Dim = Field(
        Dim(choices=[4, 8, 16, 32, 64]),
        description="LoRA rank r, integers >= 1; higher: more capacity, more memory and time",
    )
    alpha: Dim = Field(
        Dim(value=32),
        description="LoRA alpha (scaling alpha/r), > 0; with it fixed the best lr barely moves "
        "with rank, so searching it beside lr is mostly redundant",
    )
    target_modules: Dim = Field(
        Dim(choices=["attn", "attn_mlp", "all_linear"]),
        description="layers that get adapters: a named set (qv, attn, mlp, attn_mlp: Llama "
        "module names; all_linear: every linear layer but the output head, any architecture) "
        "or a list of the model's module names as PEFT takes them, e.g. [q_proj, v_proj]; "
        "checked against the model before anything is spent",
    )
    dropout: Dim = Field(Dim(value=0.05), description="LoRA dropout, in [0, 1)")
    use_rslora: Dim = Field(
        Dim(value=False), description="alpha/sqrt(r) scaling; stable high ranks"
    )
    use_dora: Dim = Field(Dim(value=False), description="weight-decomposed LoRA (slower steps)")
    loraplus_lr_ratio: Dim = Field(Dim(value=0), description="LoRA+: B-matrix lr ratio; 0 = off")
    full_lr_scale: Num = Field(
        0.1,
        gt=0,
        le=1,
        description="full-FT lr = sampled lr x this (best full-FT lr is ~10x below LoRA's)",
    )
    first_trial: Literal["prior", "sampled"] = Field(
        "prior",
        description="prior: the first trial is the config published evidence expects to do best "
        "(orchestrator/priors.py), the search proposes the rest; sampled: the search proposes all",
    )

    def fixed_values(self) -> dict:
        """The hyperparameters this space fixes (not searched), by name."""
        return {
            name: getattr(self, name).value
            for name in HYPERPARAMETERS
            if getattr(self, name).value is not None
        }

    @field_validator("method")
    @classmethod
    def _known_methods(cls, dim: Dim) -> Dim:
        bad = [m for m in dim.candidates() if m not in METHODS]
        if bad:
            raise ValueError(f"unknown {bad}; use {list(METHODS)}")
        return dim

    @field_validator("use_rslora", "use_dora")
    @classmethod
    def _booleans(cls, dim: Dim) -> Dim:
        if any(not isinstance(v, bool) for v in dim.candidates()):
            raise ValueError("values must be true or false")
        return dim

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _ratio(cls, dim: Dim) -> Dim:
        if any(not _is_number(v) or v < 0 for v in dim.candidates()):
            raise ValueError(f"values must be numbers >= 0 (0 = off; 16 is typical), {NOT_A_BOOL}")
        return dim

    @field_validator("learning_rate", "alpha")
    @classmethod
    def _positive(cls, dim: Dim) -> Dim:
        return _positive_values(dim)

    @field_validator("rank")
    @classmethod
    def _rank(cls, dim: Dim) -> Dim:
        if any(not _is_number(v) or not isinstance(v, int) or v < 1 for v in dim.candidates()):
            raise ValueError(
                f"every value must be an integer >= 1 (e.g. choices: [8, 16]), {NOT_A_BOOL}"
            )
        return dim

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, dim: Dim) -> Dim:
        if any(not _is_number(v) or not 0 <= v < 1 for v in dim.candidates()):
            raise ValueError(f"every value must be in [0, 1), {NOT_A_BOOL}")
        return dim

    @field_validator("target_modules")
    @classmethod
    def _known_sets(cls, dim: Dim) -> Dim:
        """Named sets stay as they are; a raw module list becomes its storage-safe key
        (``workers.lora.raw_target_key``); anything else is refused."""
        if dim.low is not None or dim.high is not None:
            raise ValueError(TARGETS_HINT)
        if dim.value is not None:
            return dim.model_copy(update={"value": _target_key(dim.value)})
        return dim.model_copy(update={"choices": [_target_key(c) for c in dim.choices]})

    @field_serializer("target_modules")
    def _targets_as_written(self, dim: Dim) -> dict:
        """Raw keys are dumped back as the lists they were written as (the dump parses back)."""
        out = dim.model_dump()
        if out["value"] is not None:
            out["value"] = _target_as_written(out["value"])
        if out["choices"] is not None:
            out["choices"] = [_target_as_written(c) for c in out["choices"]]
        return out


TARGETS_HINT = (
    f"use a named set ({', '.join(TARGET_MODULE_SETS)}) or a list of the model's module names "
    "as PEFT takes them, e.g. [q_proj, v_proj]; several: {choices: [attn, [q_proj, v_proj]]}"
)


def _target_key(v: Any) -> str:
    """A named set as is; a raw module list as its key (``q_proj+v_proj``)."""
    from workers.lora import MODULE_NAME, raw_target_key

    if isinstance(v, str):
        if v in TARGET_MODULE_SETS:
            return v
        raise ValueError(f"unknown set {v!r}; {TARGETS_HINT}")
    if not isinstance(v, list):
        raise ValueError(f"{v!r} is neither a set name nor a list of module names; {TARGETS_HINT}")
    if not v:
        raise ValueError(f"a module list needs at least one module name; {TARGETS_HINT}")
    bad = [m for m in v if not isinstance(m, str) or not MODULE_NAME.fullmatch(m)]
    if bad:
        raise ValueError(
            f"{bad[0]!r} is not a module name (module names are letters, digits and '_', as "
            f"the last part of a name in model.named_modules(), e.g. q_proj); {TARGETS_HINT}"
        )
    return raw_target_key(v)


def _target_as_written(key: str) -> str | list[str]:
    from workers.lora import raw_modules

    return key if key in TARGET_MODULE_SETS else raw_modules(key)


class FullSpec(_Strict):
    """Optional full-parameter runs after the LoRA sweep (the decision gate users follow by hand):
    base eval -> LoRA sweep -> full FT only if the gate calls for it and its predicted cost fits
    the remaining budget."""

    max_runs: Int = Field(0, ge=0, description="0: never run full FT")
    gate: Literal["below_target", "always"] = Field(
        "below_target",
        description="below_target: only if the best LoRA score < target_score; "
        "always: compare LoRA with full FT on your data",
    )
    target_score: Num | None = Field(
        None, description="the score LoRA must reach (gate: below_target needs it)"
    )
    learning_rate: Dim = Field(
        Dim(low=1e-5, high=1e-3, log=True), description="full-FT lr, ~10x below LoRA's"
    )

    @field_validator("learning_rate")
    @classmethod
    def _positive(cls, dim: Dim) -> Dim:
        return _positive_values(dim)

    @model_validator(mode="after")
    def _target_given(self) -> FullSpec:
        if self.max_runs and self.gate == "below_target" and self.target_score is None:
            raise ValueError("gate: below_target needs target_score (or set gate: always)")
        return self


class ModelSpec(_Strict):
    """The base model: ``embedded`` (SmolLM2-135M-Instruct shipped with lorasweep), a Hugging Face
    id, or a local folder saved with ``save_pretrained``."""

    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="`embedded` (SmolLM2-135M-Instruct, no download), a Hugging Face id "
        "(HF_HUB_OFFLINE=1: from the local hub cache only), or a local folder written by "
        "save_pretrained (relative: to the spec's folder)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )


class DataSpec(_Strict):
    """Training data: the embedded demo task, or your own JSONL files (one example per line, chat
    ``{"messages": [...]}`` or instruction ``{"instruction", "input"?, "output"}`` format)."""

    source: Literal["embedded", "files"] = Field(
        "embedded", description="embedded: the demo task shipped with lorasweep; files: yours"
    )
    train: Path | None = Field(
        None, description="JSONL rows trained on (source: files; relative: to the spec's folder)"
    )
    validation: Path | None = Field(
        None,
        description="JSONL rows scored by generation after each eval interval, the objective "
        "(source: files)",
    )
    test: Path | None = Field(
        None, description="optional JSONL rows scored once, for the promoted adapter only"
    )
    format: Literal["chat", "instruction"] = Field(
        "chat",
        description='chat: {"messages": [...]} whose last message is the assistant\'s answer; '
        'instruction: {"instruction", "input"?, "output"}',
    )
    truncation: Literal["refuse", "left"] = Field(
        "refuse",
        description="a row longer than trial.max_seq_len (prompt + answer; for validation rows "
        "prompt + trial.max_new_tokens): refuse names it before anything is spent; left drops "
        "the prompt's oldest tokens so the answer fits",
    )

    @model_validator(mode="after")
    def _files_given(self) -> DataSpec:
        if self.source == "files" and (self.train is None or self.validation is None):
            raise ValueError("source: files needs both `train` and `validation` paths")
        if self.source == "embedded" and (self.train or self.validation or self.test):
            raise ValueError(
                "source: embedded takes no file paths; set `source: files` to use yours"
            )
        return self


class TrialSpec(_Strict):
    """Limits of one trial."""

    max_steps: Int = Field(30, ge=1, description="optimizer steps per trial")
    eval_every: Int = Field(10, ge=1, description="steps between evals (and budget checks)")
    batch_size: Int = Field(8, ge=1, description="examples per step; small-medium suits LoRA")
    max_seq_len: Int = Field(
        256, ge=16, description="tokens of a row; longer rows: see data.truncation"
    )
    eval_examples: Int = Field(24, ge=1, description="validation rows scored by generation")
    max_new_tokens: Int = Field(96, ge=1, description="generation length when scoring")
    warmup_fraction: Num = Field(
        0.1, ge=0, lt=1, description="share of max_steps the learning rate warms up over"
    )
    seed: Int = Field(0, description="seed of adapter initialisation and data order")
    max_retries: Int = Field(
        2,
        ge=0,
        description="times a trial whose worker was lost (killed, node removed, preempted) is "
        "retried from its last checkpoint; the lost attempt's spend stays counted",
    )
    compile: bool = Field(
        False,
        description="torch.compile decoder layers on GPU and replay them as CUDA graphs: LoRA "
        "steps 2.3-2.7x plain PEFT on an H100; compiling costs ~10-90 s per worker process, "
        "then again per new packed-length bucket (128 tokens) and per new adapter shape "
        "(rank, targets); worth it for trials of hundreds of steps",
    )

    @model_validator(mode="after")
    def _eval_fits(self) -> TrialSpec:
        if self.eval_every > self.max_steps:
            raise ValueError(
                f"eval_every ({self.eval_every}) must be <= max_steps ({self.max_steps})"
            )
        if self.max_new_tokens >= self.max_seq_len:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be < max_seq_len "
                f"({self.max_seq_len}): a validation row's prompt and its generation must fit "
                "in max_seq_len; lower max_new_tokens or raise max_seq_len"
            )
        return self


class ResourcesSpec(_Strict):
    """What each trial holds, and how many run at once."""

    accelerator: str = Field("cpu", description="a key of the price catalog, e.g. cpu, H100, A10G")
    gpus_per_trial: Int = Field(
        0, ge=0, description="GPUs each trial holds (and is billed for); 0 with accelerator: cpu"
    )
    cpus_per_trial: Int = Field(
        1, ge=1, description="CPU cores each trial holds; on CPU, what a trial is billed for"
    )
    max_concurrent_trials: Int = Field(
        1, ge=1, description="trials running at once (each admitted only within the budget)"
    )
    pack_slots: Annotated[Int, Field(ge=1, le=16)] | Literal["auto"] = Field(
        1,
        description="LoRA trials packed as slots over one shared base on one trial's GPU, each "
        "billed its share of the step's tokens (orchestrator/pack_sweep.py); 1: unpacked, 2..16: "
        "that many, refused before any spend when the memory estimate says they do not fit; "
        "auto: the largest K <= 8 the estimate fits for the space's largest rank and widest "
        "target set (on accelerator: cpu, 2); `lorasweep validate` prints K and its peak",
    )

    @field_validator("pack_slots", mode="before")
    @classmethod
    def _pack_slots_word(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"must be an integer 1..16 or auto, got {v!r}")
        return v

    @model_validator(mode="after")
    def _gpu_matches(self) -> ResourcesSpec:
        if self.accelerator == "cpu" and self.gpus_per_trial:
            raise ValueError("accelerator: cpu takes gpus_per_trial: 0; name the GPU type instead")
        if self.accelerator != "cpu" and not self.gpus_per_trial:
            raise ValueError(f"accelerator: {self.accelerator} needs gpus_per_trial >= 1")
        return self


class PricesSpec(_Strict):
    """Price catalog (``$/GPU-hour``; ``cpu`` is ``$/core-hour``) and your own overrides."""

    catalog: Path | None = Field(None, description="YAML catalog; default: the bundled one")
    market: Literal["on_demand", "spot"] = Field(
        "on_demand", description="bill at on-demand or spot rates (spot trials can be preempted)"
    )
    overrides: dict[str, Num] = Field(
        default_factory=dict,
        description="your own price per accelerator, e.g. {A10G: 0.75}; each > 0, US dollars",
    )

    @field_validator("overrides")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:  # finite: Num
        for name, price in v.items():
            if price <= 0:
                raise ValueError(f"price of {name} must be > 0 (got {price})")
        return v


class StorageSpec(_Strict):
    """Where results go. Defaults are embedded (no servers) under ``data_dir``."""

    data_dir: Path = Field(
        Path("lorasweep-data"),
        description="folder of the embedded stores (MLflow, Optuna, ledger, Ray results); "
        "unset: --data-dir / LORASWEEP_DATA if given, else ./lorasweep-data; set here, it wins",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="default sqlite:///<data_dir>/mlflow.db"
    )
    optuna_storage: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite in data_dir"
    )
    ray_address: str | None = Field(None, description="Ray cluster address; default: local Ray")
    ray_storage: str | None = Field(
        None,
        description="Tune's storage (trial checkpoints, adapters until MLflow has them): a folder "
        "every node reads at the same path (NFS) or an object-store URI (s3://bucket/prefix); "
        "default <data_dir>/ray, one machine only. Required on a Ray cluster",
    )
    service_db: str | None = Field(
        None, description="SQLAlchemy URL of the budget ledger; default sqlite in data_dir"
    )


class EarlyStoppingSpec(_Strict):
    """ASHA: trials are compared at rungs; the worse ones stop."""

    enabled: bool = Field(True, description="false: every trial runs all its steps")
    grace_fraction: Num = Field(
        0.3, ge=0.2, le=1, description="first rung as a share of max_steps (>= 0.2)"
    )
    reduction_factor: Int = Field(
        3, ge=2, description="1 in this many trials goes on past each rung; higher: cut harder"
    )


class ObjectiveSpec(_Strict):
    """What the search optimises, measured on the validation rows."""

    metric: Literal["score", "eval_loss"] = Field(
        "score",
        description="score: field-level exact match of generated JSON (whole-answer match "
        "otherwise); eval_loss: loss on the validation answers",
    )
    mode: Literal["max", "min"] = Field("max", description="max for score, min for eval_loss")

    @model_validator(mode="after")
    def _mode_matches(self) -> ObjectiveSpec:
        expected = "max" if self.metric == "score" else "min"
        if self.mode != expected:
            raise ValueError(f"metric {self.metric} is optimised with mode: {expected}")
        return self


class SweepSpec(_Strict):
    """A whole sweep. Only ``name`` and ``budget_usd`` are required."""

    name: str = Field(
        description=f"1-{NAME_MAX_CHARS} letters, digits, '_', '.', '-'; names folders and runs"
    )
    budget_usd: Num = Field(description="hard cap on total spend, US dollars")
    objective: ObjectiveSpec = Field(ObjectiveSpec(), description="what the search optimises")
    model: ModelSpec = Field(ModelSpec(), description="the base model")
    data: DataSpec = Field(DataSpec(), description="training and validation data")
    search_space: SearchSpace = Field(
        SearchSpace(preset="default"), description="what Optuna searches (a preset + overrides)"
    )
    trial: TrialSpec = Field(TrialSpec(), description="limits of one trial")
    resources: ResourcesSpec = Field(
        ResourcesSpec(), description="what each trial holds, how many run at once"
    )
    max_trials: Int = Field(32, ge=1, description="upper bound; the budget usually ends it first")
    max_consecutive_failures: Int = Field(
        3, ge=1, description="the sweep stops after this many trials in a row failed"
    )
    early_stopping: EarlyStoppingSpec = Field(
        EarlyStoppingSpec(), description="ASHA: worse trials stop at rungs"
    )
    full: FullSpec = Field(FullSpec(), description="optional full-parameter runs after LoRA")
    prices: PricesSpec = Field(PricesSpec(), description="price catalog, market, overrides")
    storage: StorageSpec = Field(StorageSpec(), description="where results and state go")

    @model_validator(mode="after")
    def _methods_fit_resources(self) -> SweepSpec:
        if "qlora" in self.search_space.method.candidates() and self.resources.accelerator == "cpu":
            raise SpecError(
                "search_space.method",
                "qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora on CPU or set "
                "resources.accelerator to a GPU type",
            )
        from orchestrator.pack_sweep import refusal

        refused = refusal(self)
        if refused is not None:
            raise SpecError(*refused)
        return self

    @field_validator("budget_usd", mode="before")
    @classmethod
    def _budget_is_a_number(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be an amount in dollars, {NOT_A_BOOL}; e.g. budget_usd: 20")
        return v

    @field_validator("budget_usd")
    @classmethod
    def _positive_budget(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be a finite amount > 0 (got {v}); e.g. budget_usd: 20")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if len(v) > NAME_MAX_CHARS or not _NAME.fullmatch(v):
            raise ValueError(
                f"{v[:80]!r} will not do: use 1-{NAME_MAX_CHARS} characters, letters (A-Z, a-z), "
                "digits, '_', '.' or '-', starting with a letter or digit (the name goes into "
                "folder names, MLflow experiments and database rows), e.g. name: demo-sweep"
            )
        return v

    def public_dump(self) -> dict:
        """``model_dump(mode="json")`` with the password of every storage URL hidden: what may be
        shown, logged to MLflow or written next to a sweep's results."""
        from orchestrator.secrets import hide_password

        out = self.model_dump(mode="json")
        storage = out["storage"]
        for key in URL_FIELDS:
            if storage.get(key):
                storage[key] = hide_password(storage[key])
        return out

    @property
    def eval_steps(self) -> list[int]:
        """Steps at which a trial evaluates and reports (the last step always)."""
        t = self.trial
        steps = list(range(t.eval_every, t.max_steps + 1, t.eval_every))
        return steps if steps and steps[-1] == t.max_steps else [*steps, t.max_steps]

    @property
    def first_rung_reports(self) -> int:
        """ASHA grace period in reports: the first rung sits at >= grace_fraction of max_steps."""
        steps = self.eval_steps
        need = self.early_stopping.grace_fraction * self.trial.max_steps
        return next(i for i, s in enumerate(steps, 1) if s >= need - 1e-9)


def _fix_hint(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key; remove it or fix its spelling (every key: {SPEC_REFERENCE})"
    if kind == "missing":
        return f"required key is missing; add it (every key: {SPEC_REFERENCE})"
    if kind == "finite_number":
        return f"must be a finite number, not .nan or .inf (got {err.get('input')!r})"
    return err["msg"].removeprefix("Value error, ")


def _raise_first(exc: ValidationError, prefix: str = "") -> None:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    raise SpecError(prefix + loc if loc else prefix.rstrip(".") or "spec", _fix_hint(err)) from None


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last one
    silently), naming its dotted path and both lines."""

    def construct_document(self, node):
        _refuse_duplicate_keys(node)
        return super().construct_document(node)


def _refuse_duplicate_keys(root) -> None:
    """Walk the composed YAML nodes; raise :class:`SpecError` at the first key given twice."""
    todo, seen = [(root, "")], set()
    while todo:
        node, path = todo.pop()
        if id(node) in seen:  # anchors and aliases share nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo += [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        lines: dict[tuple, int] = {}  # (tag, text) of each key: `1` and `"1"` differ
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base`: keys next to it override on purpose
                continue
            scalar = isinstance(key_node, yaml.ScalarNode)
            key = key_node.value if scalar else "?"
            where = f"{path}.{key}" if path else str(key)
            line, seen_at = key_node.start_mark.line + 1, lines.get((key_node.tag, key))
            if scalar and seen_at:
                raise SpecError(where, f"given twice (lines {seen_at} and {line}); keep one")
            lines[key_node.tag, key] = line
            todo.append((value_node, where))


def _load_yaml(text: str):
    """YAML text to Python objects, refusing duplicate keys."""
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(
            "search_space.preset",
            f"unknown preset {name!r}; choose one of {', '.join(preset_names())}",
        )
    data = _load_yaml(path.read_text(encoding="utf-8")) or {}
    try:
        SearchSpace.model_validate(data)
    except ValidationError as exc:
        _raise_first(exc, f"search_spaces/{name}.yaml: ")
    return data


def _resolve_search_space(raw: dict) -> dict:
    space = raw.get("search_space")
    if space is None:
        space = {"preset": "default"}
    if not isinstance(space, dict):
        raise SpecError("search_space", "must be a mapping, e.g. {preset: default}")
    preset = space.get("preset")
    merged = {**load_preset(preset), **space} if preset else dict(space)
    return {**raw, "search_space": merged}


def _resolve_paths(spec: SweepSpec, base: Path) -> SweepSpec:
    def rel(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    data = spec.data.model_copy(
        update={
            k: rel(getattr(spec.data, k)) or getattr(spec.data, k)
            for k in ("train", "validation", "test")
        }
    )
    prices = spec.prices.model_copy(
        update={"catalog": rel(spec.prices.catalog) or spec.prices.catalog}
    )
    model = spec.model
    if model.name_or_path.startswith((".", "/", "~")):
        local = Path(model.name_or_path).expanduser()
        model = model.model_copy(
            update={"name_or_path": str(local if local.is_absolute() else base / local)}
        )
    return spec.model_copy(update={"data": data, "prices": prices, "model": model})


def parse_spec(raw: Any, base_dir: Path = Path(".")) -> SweepSpec:
    """Validate a spec already read from YAML; raises :class:`SpecError` naming the field."""
    if not isinstance(raw, dict):
        raise SpecError("spec", "must be a YAML mapping with at least `name` and `budget_usd`")
    raw = _resolve_search_space(raw)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        _raise_first(exc)
    return _resolve_paths(spec, base_dir)


def load_spec(path: Path | str | None = None) -> SweepSpec:
    """Load and validate a spec file; ``None`` loads the embedded demo (``examples/demo.yaml``)."""
    path = Path(path) if path is not None else EXAMPLE_SPEC
    if not path.is_file():
        raise SpecError("SPEC", f"file {path} not found; pass the path of a sweep YAML")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        byte = data[exc.start]
        raise SpecError(
            "SPEC", f"{path}:{line} is not UTF-8 text (byte {byte:#04x}); save it as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError("SPEC", f"{path} is not valid YAML: {exc}") from None
    return parse_spec(raw, path.resolve().parent)
