"""Predicting what a trial will cost before it launches.

    seconds = startup + steps x step_s + evals x closing_s
    step_s  = tokens per step x FLOPs per token (method, rank, targets) / FLOP/s (method)
    usd     = price x SAFETY x seconds

FLOPs per token (forward + backward; ``N_matmul`` = weights of every matmul incl. the output head,
``N_lora`` = adapter weights, attention term from the score and value matmuls over ``seq``):

    lora, qlora:  4 x N_matmul + 6 x N_lora + 12 x layers x d_model x seq
    full:         6 x N_matmul            + 12 x layers x d_model x seq

LoRA does no weight gradients for the frozen base (4N, not 6N); QLoRA does the same FLOPs but
dequantises every weight on each use, so its FLOP/s is lower (``METHOD_RATE``).

The FLOP/s is a conservative prior per accelerator until a trial reports; then it is calibrated
per (model, method, accelerator) from measured step times, keeping the slowest seen, and stored
so the next sweep of the same model on the same accelerator starts calibrated. Startup (actor,
imports, model load) and closing (eval + adapter save) times are measured the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SAFETY = 1.25  # headroom on every prediction that reserves money

# Conservative FLOP/s per unit (core for cpu, GPU otherwise) until measured. Measured here:
# SmolLM2-135M LoRA on 2 cores ~60 tok/s/core (4.9e10 FLOP/s); H100 0.5B LoRA 41k tok/s (1.2e14).
# Priors are about half of those.
PRIOR_FLOPS_PER_S = {"cpu": 2.5e10, "H100": 6e13, "H200": 6e13}
PRIOR_GPU_FLOPS_PER_S = 2e13
PRIOR_STARTUP_S = {"cpu": 15.0}  # actor start, imports, model load
# On a GPU: actor start, imports and first CUDA use, then the weights. Measured cold on the H100
# (2026-11-24): 5.6-8.3 s for the first trial's imports, CUDA start and the 135M model's load, plus
# a few seconds of Ray actor start. The weights at 0.5 GB/s (bf16: 2 bytes per matmul weight):
# the demo model 20.5 s, 7B 48 s, 70B 300 s. (A flat 60 s refused small budgets on small models.)
PRIOR_GPU_STARTUP_BASE_S = 20.0
PRIOR_LOAD_BYTES_PER_S = 0.5e9
PRIOR_RELEASE_S = 2.0  # billed after a trial's last report, until its resources are released
# FLOP/s of a method relative to LoRA on the same hardware (QLoRA dequantises every weight)
METHOD_RATE = {"lora": 1.0, "qlora": 1 / 1.4, "full": 1.0}


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


@dataclass(frozen=True)
class CostModel:
    """Predicts a trial's seconds and dollars from its config and the sweep's measurements."""

    price_usd_per_hour: float
    accelerator: str
    units: int  # cores on cpu, GPUs otherwise
    dims: ModelDims
    seq_len: int  # padded tokens per row
    batch_size: int
    eval_batches: int  # eval_examples / batch_size, rounded up

    def flops_per_step(self, hp: dict) -> float:
        per_token = flops_per_token(
            self.dims,
            hp.get("method", "lora"),
            self.seq_len,
            int(hp.get("rank") or 0),
            str(hp.get("target_modules") or "all_linear"),
        )
        return per_token * self.seq_len * self.batch_size

    def flops_per_s(self, method: str, measured: dict[str, float]) -> float:
        """Measured for this method, else derived from another method's measurement, else the
        prior; always the slowest known."""
        if measured.get(rate_key(method)):
            return measured[rate_key(method)]
        derived = [
            measured[rate_key(m)] / METHOD_RATE[m] * METHOD_RATE.get(method, 1.0)
            for m in METHOD_RATE
            if measured.get(rate_key(m))
        ]
        if derived:
            return min(derived)
        prior = PRIOR_FLOPS_PER_S.get(self.accelerator, PRIOR_GPU_FLOPS_PER_S) * self.units
        return prior * METHOD_RATE.get(method, 1.0)

    def timings(self, hp: dict, measured: dict[str, float]) -> dict[str, float]:
        step = self.flops_per_step(hp) / self.flops_per_s(hp.get("method", "lora"), measured)
        # eval = loss pass + greedy generation; prior: ~1.5 train steps per eval batch
        closing = measured.get("closing_s") or 1.5 * step * self.eval_batches
        startup = measured.get("startup_s") or self.startup_prior_s()
        release = measured.get("release_s") or PRIOR_RELEASE_S
        return {"step_s": step, "closing_s": closing, "startup_s": startup, "release_s": release}

    def startup_prior_s(self) -> float:
        if self.accelerator in PRIOR_STARTUP_S:
            return PRIOR_STARTUP_S[self.accelerator]
        return PRIOR_GPU_STARTUP_BASE_S + 2 * self.dims.n_matmul / PRIOR_LOAD_BYTES_PER_S

    def seconds(self, hp: dict, steps: int, evals: int, measured: dict[str, float]) -> float:
        """Billed seconds: startup, steps, evals, and the release after the last report (which the
        worker keeps inside its ceiling, so admission must reserve it too)."""
        t = self.timings(hp, measured)
        return t["startup_s"] + steps * t["step_s"] + evals * t["closing_s"] + t["release_s"]

    def usd(
        self, hp: dict, steps: int, evals: int, measured: dict[str, float], safety: float = SAFETY
    ) -> float:
        return self.price_usd_per_hour * safety * self.seconds(hp, steps, evals, measured) / 3600.0

    def calibration(self, hp: dict, step_s: float | None) -> dict[str, float]:
        """The measurement a trial's step time gives: FLOP/s of its method on this hardware."""
        if not step_s or step_s <= 0:
            return {}
        return {rate_key(hp.get("method", "lora")): self.flops_per_step(hp) / step_s}
