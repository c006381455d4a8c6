"""Predicting what a trial will cost before it launches.

    seconds = startup + compile + steps x step_s + evals x (closing_s + report_s) + release_s
    step_s  = FLOPs per step (method, rank, targets) / FLOP/s (method), or from the prior below
    usd     = price x SAFETY x seconds

Each term has its own timing, per method and phase, calibrated separately from what trials
report (``CostModel.measurements``; the ledger keeps the slowest FLOP/s and the longest duration
of the last few measurements of each name):

    flops_per_s:<method>        effective training FLOP/s of the method on this hardware
    startup_s:<method>:fresh    actor start, imports, model load and data, on a new worker
    startup_s:<method>:reused   the same on a worker that kept the base model (LoRA, QLoRA)
    closing_s:<method>          one eval + save (full FT saves the whole model)
    save_s:<method>             the save alone, to carry one method's closing to another
    report_s:<method>           ``tune.report``'s copy of the checkpoint to the trial's storage
    compile_s                   ``trial.compile``'s compilation (GPU only)
    release_s                   billed after the last report, until resources are released

A lookup takes the most specific measured name, then a less specific measured one (another
method's, adjusted by the priors' difference between the methods; the single ``startup_s``,
``closing_s`` of older ledgers), then the prior. Measurements are stored per (model,
``calibration_accelerator(...)``), which names what changes speed besides the method: the
accelerator and how many, the dtype, ``trial.compile``.

FLOPs per token (forward + backward; ``N_matmul`` = weights of every matmul incl. the output head,
``N_lora`` = adapter weights, attention term from the score and value matmuls over ``seq``):

    lora, qlora:  4 x N_matmul + 6 x N_lora + 12 x layers x d_model x seq
    full:         6 x N_matmul            + 12 x layers x d_model x seq

Priors, and the measurements they come from (bench/RESULTS.md: its throughput section for the GPU
rates, goodput and eval_decode for the trial phases; CPU figures measured on this project's 2-core
x86_64 CI machine, SmolLM2-135M-Instruct in float32):

- CPU: 6e10 FLOP/s per core, counted on padded tokens (rows are packed, so fewer are computed).
  SmolLM2-135M LoRA r16 all-linear, 8 x 128 tokens on 2 cores: 4-5 s a step (prior 5.1 s); the
  demo's batch 4 x 151 on 1 core: 4.3 s (prior 6.0 s).
- GPU: step = FLOPs / rate + layers x a per-layer launch cost, fitted to the H100 throughput
  bench (bf16 batch 8 x 1024, 0.5B and 1.5B Llama shapes): plain LoRA 2.5e14 FLOP/s and 5.2 ms a
  layer, full FT 1.6x the rate and 1.9 ms a layer; ``trial.compile`` 1.9x the rate (full FT
  1.1x) and 0.3x the launch cost. The same prior gives the H200 demo trials' 0.16 s step (135M,
  batch 8 x 256).
- Eval: a teacher-forced pass (forward FLOPs at the training rate) plus ``max_new_tokens`` greedy
  decoding steps: on CPU row-tokens x 2 N_matmul at 4e10 FLOP/s per core, or every weight read
  at 10 GB/s each step where that is slower (the demo's 16 rows x 80 tokens took 12.3 s on 1
  core, prior 19.9 s; 4 rows x 48 tokens 4.0 s, prior 5.4 s); on GPU the larger of the weights
  read at 2.5 TB/s and 0.15 ms a layer per step (the H200 demo eval of 24 rows x 96 tokens:
  0.36 s, prior 0.49 s).
- Save: 0.05 s plus the bytes written at 0.5 GB/s (``SAVE_BYTES_PER_S``): adapters in float32,
  full FT the whole model in its dtype. The checkpoint copy at report: 0.05 s plus the same bytes
  at 1 GB/s.
- Startup: fresh CPU 6 s (actor start, imports of torch/transformers/PEFT on 2 cores) and fresh
  GPU 10 s (the same plus the CUDA start; 5.6-8.3 s measured cold on the H100 before the actor's
  own start), plus the weights at 1 GB/s; a reused worker 1 s (measured 0.03-0.35 s of load).
- Unmeasured guesses, stated as such: float32 on a GPU at 0.25x the bf16 rate, half precision on
  a CPU at 0.5x; QLoRA at 1/1.4 of LoRA's rate with 1.4x its launch cost (it dequantises every
  weight on each use); compile 60 s per trial (the spec's 10-90 s per process, again per new
  shape).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

SAFETY = 1.25  # headroom on every prediction that reserves money
METHODS = ("lora", "qlora", "full")
ADAPTER_METHODS = ("lora", "qlora")

# --- priors (see the module docstring for where each comes from) ------------------------------
PRIOR_CPU_FLOPS_PER_CORE = 6e10  # training, on padded tokens
PRIOR_CPU_DECODE_FLOPS_PER_CORE = 4e10  # greedy decoding
PRIOR_GPU_FLOPS_PER_S = {  # plain LoRA training, bf16 (the other methods scale from it)
    "H100": 2.5e14,
    "H200": 2.5e14,
    "A100-40GB": 8e13,
    "A100-80GB": 8e13,
    "L40S": 6e13,
}
PRIOR_OTHER_GPU_FLOPS_PER_S = 3e13  # T4, L4, A10G and GPUs not listed: conservative
PRIOR_LAYER_S = {"lora": 5.2e-3, "qlora": 7.3e-3, "full": 1.9e-3}  # launch cost per layer, step
METHOD_RATE = {"lora": 1.0, "qlora": 1 / 1.4, "full": 1.6}  # GPU FLOP/s relative to LoRA
CPU_METHOD_RATE = {"lora": 1.0, "qlora": 1 / 1.4, "full": 1.0}
# trial.compile: FLOP/s x (per method), per-layer launch cost x
COMPILE_RATE = {"lora": 1.9, "qlora": 1.9, "full": 1.1}
COMPILE_LAYER = 0.3
DTYPE_RATE = {("gpu", "float32"): 0.25, ("cpu", "bfloat16"): 0.5, ("cpu", "float16"): 0.5}
PRIOR_GPU_DECODE_LAYER_S = 1.5e-4  # per decoding step and layer
PRIOR_GPU_BYTES_PER_S = 2.5e12  # weights read per decoding step
PRIOR_CPU_BYTES_PER_S = 1e10
SAVE_BYTES_PER_S = 0.5e9  # checkpoint write (safetensors)
COPY_BYTES_PER_S = 1e9  # tune.report's copy of the checkpoint
PRIOR_FILE_S = 0.05  # fixed cost of a save or a copy
PRIOR_STARTUP_S = {"cpu": 6.0, "gpu": 10.0}  # fresh worker, before the weights
PRIOR_LOAD_BYTES_PER_S = 1e9
PRIOR_REUSED_STARTUP_S = 1.0
PRIOR_COMPILE_S = 60.0
PRIOR_RELEASE_S = 1.0  # billed after a trial's last report, until its resources are released
MAX_DECODE_ROWS = 32  # rows decoded at a time (workers.evaluate.MAX_CHUNK_ROWS)
ADAPTER_BYTES = 4  # adapters are trained and saved in float32

# names whose measurements carry over to later sweeps of the same model and calibration
# accelerator (closing time depends on each sweep's eval settings, so ``closing_s:`` does not)
PORTABLE_PREFIXES = (
    "flops_per_s:",
    "startup_s:",
    "save_s:",
    "report_s:",
    "compile_s",
    "release_s",
)


@dataclass(frozen=True)
class ModelDims:
    """What the FLOPs count needs from a decoder: matmul weights, depth, width, and (for the
    Llama family) each projection's shape, for exact adapter sizes."""

    n_matmul: int
    layers: int
    d_model: int
    shape: object | None = None  # workers.memory.ModelShape when the config is Llama-shaped
    model_type: str = ""  # the config's model_type (``llama``, ``qwen2``...), where known

    @classmethod
    def from_config(cls, config, n_params: int) -> ModelDims:
        from workers.memory import ModelShape

        kind = getattr(config, "model_type", "") or ""
        try:
            shape = ModelShape.from_config(config)
        except AttributeError:
            d = getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
            layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
            return cls(n_matmul=n_params, layers=int(layers), d_model=int(d), model_type=kind)
        return dataclasses.replace(cls.from_shape(shape), model_type=kind)

    @classmethod
    def from_shape(cls, shape) -> ModelDims:
        """From a ``workers.memory.ModelShape`` (Llama family)."""
        head = shape.vocab * shape.hidden  # the output head is a matmul even when tied
        return cls(shape.n_linear + head, shape.layers, shape.hidden, shape)

    @property
    def n_params(self) -> int:
        """Weights a full save writes (all parameters where the shape is known)."""
        return self.shape.n_params if self.shape is not None else self.n_matmul

    def n_lora(self, rank: int, targets: str) -> int:
        from workers.lora import TARGET_MODULES

        if self.shape is None:  # unknown shape: every linear gets r x (d + d) per projection
            return self.layers * 7 * rank * 2 * self.d_model
        return self.shape.n_lora(rank, TARGET_MODULES.get(targets, "all-linear"))


def flops_per_token(
    dims: ModelDims, method: str, seq: int, rank: int = 0, targets: str = ""
) -> float:
    attention = 12 * dims.layers * dims.d_model * seq
    if method == "full":
        return 6 * dims.n_matmul + attention
    return 4 * dims.n_matmul + 6 * dims.n_lora(rank, targets) + attention


def rate_key(method: str) -> str:
    return f"flops_per_s:{method}"


def startup_key(method: str, reused: bool) -> str:
    return f"startup_s:{method}:{'reused' if reused else 'fresh'}"


def resolved_dtype(accelerator: str, dtype: str) -> str:
    """The dtype a trial trains in: ``auto`` is float32 on CPU, bfloat16 on a GPU."""
    if dtype and dtype != "auto":
        return dtype
    return "float32" if accelerator == "cpu" else "bfloat16"


def calibration_accelerator(accelerator: str, units: int, dtype: str, compile: bool) -> str:
    """The hardware half of a calibration key: what changes a trial's speed besides its method
    (which is in each timing's name), e.g. ``H100x1:bfloat16:compile`` or ``cpux2:float32``.
    ``compile`` counts on GPUs only (the worker compiles nothing on CPU)."""
    key = f"{accelerator}x{units}:{resolved_dtype(accelerator, dtype)}"
    return key + (":compile" if compile and accelerator != "cpu" else "")


def spec_calibration_key(spec) -> tuple[str, str]:
    """(model, calibration accelerator) of a sweep spec: where its measurements are stored."""
    res = spec.resources
    units = res.cpus_per_trial if res.accelerator == "cpu" else res.gpus_per_trial
    return spec.model.name_or_path, calibration_accelerator(
        res.accelerator, units, spec.model.dtype, spec.trial.compile
    )


def sqlite_file_missing(url: str) -> bool:
    """True for a sqlite URL whose database file does not exist (or an in-memory one)."""
    if not url.startswith("sqlite:"):
        return False
    path = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
    return not path or path == ":memory:" or not Path(path).is_file()


def stored_calibration(spec, service_db: str | None = None) -> dict[str, float]:
    """The measured timings earlier sweeps stored for this spec's model and calibration
    accelerator; empty when there are none. ``service_db`` defaults to the spec's ledger URL. A
    sqlite file that does not exist is not created (then there is no calibration)."""
    if service_db is None:
        from orchestrator.sweep import storage_urls

        service_db = storage_urls(spec)[3]
    if sqlite_file_missing(service_db):
        return {}
    from orchestrator.store import Store

    return Store(service_db).calibration(*spec_calibration_key(spec))


@dataclass(frozen=True)
class Timing:
    """One predicted duration and where it came from: a measured name or ``prior``."""

    seconds: float
    source: str

    @property
    def measured(self) -> bool:
        return self.source != "prior"


@dataclass(frozen=True)
class CostModel:
    """Predicts a trial's seconds and dollars from its config and the sweep's measurements.

    ``stored`` holds measurements stored by earlier sweeps (``stored_calibration``); a
    ``measured`` dict passed to a prediction overrides them name by name."""

    price_usd_per_hour: float
    accelerator: str
    units: int  # cores on cpu, GPUs otherwise (a trial trains on one GPU)
    dims: ModelDims
    seq_len: int  # padded tokens per row
    batch_size: int
    eval_batches: int  # eval_examples / batch_size, rounded up
    max_new_tokens: int = 96
    dtype: str = "auto"
    compile: bool = False
    stored: dict = field(default_factory=dict, compare=False, hash=False)

    # --- shape of the work -----------------------------------------------------------------
    @property
    def on_cpu(self) -> bool:
        return self.accelerator == "cpu"

    @property
    def compiled(self) -> bool:
        return self.compile and not self.on_cpu

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight in the trial's dtype."""
        return 4 if resolved_dtype(self.accelerator, self.dtype) == "float32" else 2

    def flops_per_step(self, hp: dict) -> float:
        per_token = flops_per_token(
            self.dims,
            hp.get("method", "lora"),
            self.seq_len,
            int(hp.get("rank") or 0),
            str(hp.get("target_modules") or "all_linear"),
        )
        return per_token * self.seq_len * self.batch_size

    def save_bytes(self, hp: dict) -> int:
        """What one save writes: the adapter (float32), or the whole model for full FT."""
        if hp.get("method", "lora") == "full":
            return self.dims.n_params * self.weight_bytes
        rank = int(hp.get("rank") or 16)
        targets = str(hp.get("target_modules") or "all_linear")
        return self.dims.n_lora(rank, targets) * ADAPTER_BYTES

    # --- priors ----------------------------------------------------------------------------
    def _dtype_rate(self) -> float:
        kind = "cpu" if self.on_cpu else "gpu"
        return DTYPE_RATE.get((kind, resolved_dtype(self.accelerator, self.dtype)), 1.0)

    def _train_rate(self, method: str) -> float:
        """FLOP/s of the prior's compute term."""
        if self.on_cpu:
            rate = PRIOR_CPU_FLOPS_PER_CORE * self.units * CPU_METHOD_RATE.get(method, 1.0)
        else:
            base = PRIOR_GPU_FLOPS_PER_S.get(self.accelerator, PRIOR_OTHER_GPU_FLOPS_PER_S)
            rate = (
                base
                * METHOD_RATE.get(method, 1.0)
                * (COMPILE_RATE.get(method, 1.0) if self.compiled else 1.0)
            )
        return rate * self._dtype_rate()

    def prior_step_s(self, hp: dict) -> float:
        method = hp.get("method", "lora")
        step = self.flops_per_step(hp) / self._train_rate(method)
        if not self.on_cpu:
            launch = PRIOR_LAYER_S.get(method, PRIOR_LAYER_S["lora"]) * self.dims.layers
            step += launch * (COMPILE_LAYER if self.compiled else 1.0)
        return step

    def prior_eval_s(self, hp: dict) -> float:
        """A teacher-forced pass over the eval rows and ``max_new_tokens`` decoding steps."""
        rows = self.eval_batches * self.batch_size
        forward = 2 * self.dims.n_matmul + 4 * self.dims.layers * self.dims.d_model * self.seq_len
        # the same forward for every method (adapters are merged for eval): only the save differs
        loss_pass = rows * self.seq_len * forward / self._train_rate("lora")
        chunks = math.ceil(rows / max(MAX_DECODE_ROWS, self.batch_size))
        steps = chunks * self.max_new_tokens
        compute = rows * self.max_new_tokens * 2 * self.dims.n_matmul
        weights = self.dims.n_matmul * self.weight_bytes
        if self.on_cpu:
            decode_rate = PRIOR_CPU_DECODE_FLOPS_PER_CORE * self.units * self._dtype_rate()
            # each decoding step reads every weight once: bound by that or by the compute
            decode = max(compute / decode_rate, steps * weights / PRIOR_CPU_BYTES_PER_S)
            return loss_pass + decode
        per_step = max(weights / PRIOR_GPU_BYTES_PER_S, PRIOR_GPU_DECODE_LAYER_S * self.dims.layers)
        return loss_pass + compute / (self._train_rate("lora") / 4) + steps * per_step

    def prior_save_s(self, hp: dict) -> float:
        return PRIOR_FILE_S + self.save_bytes(hp) / SAVE_BYTES_PER_S

    def prior_report_s(self, hp: dict) -> float:
        return PRIOR_FILE_S + self.save_bytes(hp) / COPY_BYTES_PER_S

    def prior_startup_s(self, hp: dict, reused: bool) -> float:
        if reused and hp.get("method", "lora") != "full":
            return PRIOR_REUSED_STARTUP_S
        base = PRIOR_STARTUP_S["cpu" if self.on_cpu else "gpu"]
        return base + self.dims.n_params * self.weight_bytes / PRIOR_LOAD_BYTES_PER_S

    def startup_prior_s(self) -> float:
        """A fresh worker's startup prior for LoRA (kept for older callers)."""
        return self.prior_startup_s({"method": "lora"}, reused=False)

    # --- lookups ---------------------------------------------------------------------------
    def _with_method(self, hp: dict, method: str) -> dict:
        other = {**hp, "method": method}
        if method != "full":
            other.setdefault("rank", 16)
            other.setdefault("target_modules", "all_linear")
        return other

    def _merged(self, measured: dict[str, float] | None) -> dict[str, float]:
        return {**self.stored, **(measured or {})}

    def flops_per_s(self, method: str, measured: dict[str, float], hp: dict | None = None) -> float:
        """Measured for this method, else derived from another method's measurement (scaled
        by the two methods' prior rates for this config), else the prior; the slowest known."""
        return self._step(self._with_method(hp or {}, method), self._merged(measured))[1]

    def _step(self, hp: dict, measured: dict[str, float]) -> tuple[Timing, float]:
        method = hp.get("method", "lora")
        flops = self.flops_per_step(hp)
        own = measured.get(rate_key(method))
        if own:
            return Timing(flops / own, rate_key(method)), own
        prior_rate = flops / self.prior_step_s(hp)
        derived = []
        for other in METHODS:
            value = measured.get(rate_key(other))
            if other != method and value:
                o = self._with_method(hp, other)
                ratio = prior_rate / (self.flops_per_step(o) / self.prior_step_s(o))
                derived.append((value * ratio, rate_key(other)))
        if derived:
            rate, source = min(derived)
            return Timing(flops / rate, source), rate
        return Timing(flops / prior_rate, "prior"), prior_rate

    def _per_method(self, prefix: str, hp: dict, measured: dict, prior) -> Timing:
        """``prefix:<method>`` measured, else another method's measurement moved by the priors'
        difference between the two methods (the longest), else ``prior(hp)``."""
        method = hp.get("method", "lora")
        own = measured.get(f"{prefix}:{method}")
        if own:
            return Timing(own, f"{prefix}:{method}")
        carried = []
        for other in METHODS:
            value = measured.get(f"{prefix}:{other}")
            if other != method and value:
                shift = prior(hp) - prior(self._with_method(hp, other))
                carried.append((max(value + shift, 0.0), f"{prefix}:{other}"))
        if carried:
            return Timing(*max(carried))
        return Timing(prior(hp), "prior")

    def _save(self, hp: dict, measured: dict) -> Timing:
        return self._per_method("save_s", hp, measured, self.prior_save_s)

    def _closing(self, hp: dict, measured: dict) -> Timing:
        def prior(h: dict) -> float:
            return self.prior_eval_s(h) + self.prior_save_s(h)

        found = self._per_method("closing_s", hp, measured, prior)
        if found.measured or not measured.get("closing_s"):
            return found
        # an older ledger's single closing_s, measured on adapter trials
        lora = self._with_method(hp, "lora")
        shift = self.prior_save_s(hp) - self.prior_save_s(lora)
        return Timing(measured["closing_s"] + max(shift, 0.0), "closing_s")

    def _startup(self, hp: dict, measured: dict, reused: bool | None) -> Timing:
        """Full FT always loads its model afresh; ``reused=None`` (not known) is priced fresh."""
        method = hp.get("method", "lora")
        phase_reused = bool(reused) and method != "full"
        key = startup_key(method, phase_reused)
        if measured.get(key):
            return Timing(measured[key], key)
        if phase_reused:  # any adapter method's reused start: adding an adapter is alike
            others = [(measured.get(startup_key(m, True)), startup_key(m, True)) for m in METHODS]
            others = [o for o in others if o[0]]
            if others:
                return Timing(*max(others))
        else:
            others = [(measured.get(startup_key(m, False)), startup_key(m, False)) for m in METHODS]
            others = [o for o in others if o[0]]
            if others:  # the same model load; full FT's weights may be bigger
                value, source = max(others)
                return Timing(value, source)
            if measured.get("startup_s"):  # an older ledger's single startup_s
                return Timing(measured["startup_s"], "startup_s")
        return Timing(self.prior_startup_s(hp, phase_reused), "prior")

    def explain(
        self, hp: dict, measured: dict[str, float] | None = None, reused: bool | None = None
    ) -> dict[str, Timing]:
        """Every term of a trial's prediction with the name it was measured under, or
        ``prior``."""
        measured = self._merged(measured)
        hp = self._with_method(hp, hp.get("method", "lora"))
        return {
            "step_s": self._step(hp, measured)[0],
            "closing_s": self._closing(hp, measured),
            "report_s": self._per_method("report_s", hp, measured, self.prior_report_s),
            "startup_s": self._startup(hp, measured, reused),
            "compile_s": (
                Timing(measured["compile_s"], "compile_s")
                if self.compiled and measured.get("compile_s")
                else Timing(PRIOR_COMPILE_S if self.compiled else 0.0, "prior")
            ),
            "release_s": (
                Timing(measured["release_s"], "release_s")
                if measured.get("release_s")
                else Timing(PRIOR_RELEASE_S, "prior")
            ),
        }

    def timings(
        self, hp: dict, measured: dict[str, float] | None = None, reused: bool | None = None
    ) -> dict[str, float]:
        """Seconds of each term: ``step_s``, ``closing_s`` (eval + save), ``report_s``,
        ``startup_s``, ``compile_s``, ``release_s``."""
        return {k: t.seconds for k, t in self.explain(hp, measured, reused).items()}

    def seconds(
        self,
        hp: dict,
        steps: int,
        evals: int,
        measured: dict[str, float] | None = None,
        reused: bool | None = None,
    ) -> float:
        """Billed seconds: startup (and compile), steps, evals with their checkpoint copies, and
        the release after the last report (which the worker keeps inside its ceiling, so
        admission must reserve it too)."""
        t = self.timings(hp, measured, reused)
        return (
            t["startup_s"]
            + t["compile_s"]
            + steps * t["step_s"]
            + evals * (t["closing_s"] + t["report_s"])
            + t["release_s"]
        )

    def usd(
        self,
        hp: dict,
        steps: int,
        evals: int,
        measured: dict[str, float] | None = None,
        safety: float = SAFETY,
        reused: bool | None = None,
    ) -> float:
        seconds = self.seconds(hp, steps, evals, measured, reused)
        return self.price_usd_per_hour * safety * seconds / 3600.0

    # --- measurements ----------------------------------------------------------------------
    def calibration(self, hp: dict, step_s: float | None) -> dict[str, float]:
        """The FLOP/s of ``hp``'s method that a measured step time gives."""
        if not step_s or step_s <= 0:
            return {}
        return {rate_key(hp.get("method", "lora")): self.flops_per_step(hp) / step_s}

    def measurements(self, hp: dict, result: dict, reused: bool) -> dict[str, float]:
        """Calibration entries (name -> value, for ``Ledger.calibrate``) from one trial report
        of ``workers.train.run_trial``: the method's FLOP/s, its closing (eval + save) and save,
        the checkpoint copy of the earlier reports, and at the first report the startup (what
        the phases after the load do not explain) as fresh or reused, and the compile time."""
        method = hp.get("method", "lora")
        hp = self._with_method(hp, method)
        n = int(result.get("training_iteration") or 0)
        phases = result.get("phases_s") or {}
        out: dict[str, float] = {}
        first = n == 1
        if not (self.compiled and first):  # the first interval's step time holds the compile
            out.update(self.calibration(hp, result.get("step_s")))
        if result.get("closing_s"):
            out[f"closing_s:{method}"] = float(result["closing_s"])
        if n >= 1 and phases.get("checkpoint"):
            out[f"save_s:{method}"] = phases["checkpoint"] / n
        if n >= 2 and phases.get("report"):  # this report's own copy is not in it yet
            out[f"report_s:{method}"] = phases["report"] / (n - 1)
        if first and "billed_s" in result:
            busy = sum(phases.get(k, 0.0) for k in ("step", "eval", "checkpoint", "report"))
            phase_reused = bool(reused) and method != "full"
            out[startup_key(method, phase_reused)] = float(result["billed_s"]) - busy
            if self.compiled:
                out["compile_s"] = self._compile_s(result, phases)
        return {k: v for k, v in out.items() if v and v > 0}

    @staticmethod
    def _compile_s(result: dict, phases: dict) -> float:
        """Compile time at the first report: the worker's own figure where it reports one,
        else the step seconds its steps at the reported step time do not explain (a lower
        bound: the reported step time still carries part of the compile)."""
        if result.get("compile_s"):
            return float(result["compile_s"])
        steps = int(result.get("step") or 0)
        return max(phases.get("step", 0.0) - steps * float(result.get("step_s") or 0.0), 0.0)

    def release_measurement(self, hp: dict, release_s: float | None) -> dict[str, float]:
        """The calibration entry of what a trial was billed after its last report."""
        if release_s is None or release_s <= 0:
            return {}
        return {"release_s": float(release_s)}


def is_portable(name: str) -> bool:
    """Whether a measured timing carries over to later sweeps through the store."""
    return name.startswith(PORTABLE_PREFIXES)
