"""One trial, top to bottom: setup -> train (eval + report every interval) -> save.

Callable without Ray: ``run_trial(cfg, report=print_report)``. Under Ray, the orchestrator passes a
``report`` that calls ``tune.report`` and a ``budget`` backed by the sweep's ledger actor.

Billing starts when the trial acquired its resources (``billing_start_monotonic``, on this
process's monotonic clock; default: when this function starts) and covers model load, training,
eval and checkpointing. Budget safety: before loading, the trial checks that its predicted
startup, one step and a closing fit under the ceiling the ledger granted it; before each interval,
and before every step, that its spend so far + the next chunk of work + a closing eval and save
fit; if not, it asks for more, and when refused it trains on only while a step and the closing
still fit, then closes (final eval and adapter save) inside the ceiling. A trial refused before
its first step closes at once: nothing trained, nothing to evaluate or save. A revoked grant
(``budget.revoked``, set by the sweep's watchdog) stops the trial before its next step, without
a closing; a closing sweep (``budget.closing``: Ctrl-C, SIGTERM, a cancel) stops it there, with
its closing, status ``interrupted``. What cooperation cannot stop (a hung step, load or eval) the
watchdog outside the trial stops (``orchestrator/watchdog.py``).

Every report's folder is a checkpoint the trial can continue from (``run_trial(...,
resume_from=DIR)``, what Tune's ``FailureConfig`` retries do after a lost worker): next to the
adapter (LoRA: ``adapter_model.safetensors``; full FT: the ``save_pretrained`` weights) it holds
``trainer_state.pt`` (:data:`STATE_FILE`) with the optimizer state, the step, the tokens so far,
torch's RNG state (and CUDA's where used), the billed seconds so far and the loop's time
estimates. The learning rate is a pure function of the step (``_lr_at``) and the data order of
the seed (``_batches``, fast-forwarded past the steps done), so a resumed trial continues exactly
where the uninterrupted one would have: same losses, same evals, same adapter. Its billed seconds
go on from the earlier attempts' (``TrialConfig.prior_billed_s`` or the checkpoint's, whichever
is more), so the lost attempt's spend is counted once.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from workers import evaluate, fast, faults, gpu_start, lora, model_cache, packing
from workers.data import encode_for_training, pad_batch, read_examples
from workers.methods import cache_key, setup_model
from workers.model import load_tokenizer

SAFETY = 1.25  # headroom on time estimates when checking the budget ceiling
# what a trial's config carries from the search space (all named choices: storage-safe in Optuna)
HYPERPARAMETERS = (
    "method",
    "learning_rate",
    "rank",
    "alpha",
    "target_modules",
    "dropout",
    "use_rslora",
    "use_dora",
    "loraplus_lr_ratio",
)


@dataclass
class TrialConfig:
    """Everything one trial needs; plain data so it crosses process boundaries."""

    model: str  # resolved reference (local folder or HF id)
    train_path: str
    validation_path: str
    data_format: str = "chat"
    dtype: str = "auto"
    # hyperparameters
    method: str = "lora"  # lora | qlora | full
    learning_rate: float = 1e-3
    rank: int = 16
    alpha: float = 32
    target_modules: str = "all_linear"
    dropout: float = 0.05
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None  # LoRA+: B matrices train this many times faster
    # memory: set by the orchestrator's memory check when the plain config would not fit
    gradient_checkpointing: bool = False
    micro_batch: int | None = None  # < batch_size: gradient accumulation over micro-batches
    # torch.compile the decoder layers, replayed as CUDA graphs (GPU; ~30-90 s once per process)
    compile: bool = False
    packing: bool = True  # rows packed end to end, no padding (supported decoders)
    truncation: str = "refuse"  # data.truncation: "left" drops a long prompt's oldest tokens
    reuse_base_model: bool = True  # keep the base model in this process for the next trial
    # limits
    max_steps: int = 30
    eval_every: int = 10
    batch_size: int = 8
    max_seq_len: int = 256
    eval_examples: int = 24
    max_new_tokens: int = 96
    warmup_fraction: float = 0.1
    seed: int = 0
    # money and machine
    price_usd_per_hour: float = 0.0  # for everything the trial holds
    device: str = "cpu"
    num_threads: int = 1
    prior_step_s: float = 5.0  # time estimates until this trial has measured its own
    prior_closing_s: float = 30.0
    prior_startup_s: float = 0.0  # predicted load before the first step (checked before loading)
    # billed after the last report until the sweep releases the trial's resources (measured by
    # the sweep); kept inside the ceiling like the closing eval and save
    release_s: float = 2.0
    # when the trial acquired its resources, on this process's time.monotonic(); default now
    billing_start_monotonic: float | None = None
    # billed by earlier attempts of this trial (a retry after its worker was lost): the clock
    # starts here, so reported cost and billed seconds are the trial's, all attempts together
    prior_billed_s: float = 0.0
    # fault injection for tests and bench/fault_injection.py (off by default): "hang@STEP" sleeps
    # 600 s in that step, "nan@STEP" makes that step's loss NaN (see workers/faults.py)
    fault: str | None = None

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in HYPERPARAMETERS}


class Budget(Protocol):
    """The ledger's view from a trial: a ceiling it may spend up to, raised on request, and
    ``revoked`` once the sweep's watchdog withdrew the grant (optional attribute)."""

    ceiling_usd: float

    def request(self, total_usd: float) -> bool:
        """Ask to raise this trial's ceiling to ``total_usd``; False when the cap forbids it."""


@dataclass
class FixedBudget:
    """A single trial's budget without a sweep (device runs, tests)."""

    ceiling_usd: float = math.inf

    def request(self, total_usd: float) -> bool:
        return total_usd <= self.ceiling_usd


@dataclass
class _Clock:
    """Billed time of one trial on this process's monotonic clock (never a difference of two
    hosts' clocks)."""

    price_usd_per_hour: float
    t0_monotonic: float = field(default_factory=time.monotonic)
    prior_s: float = 0.0  # billed by earlier attempts of the trial
    phases_s: dict = field(
        default_factory=lambda: dict.fromkeys(
            ("load", "data", "step", "eval", "checkpoint", "report"), 0.0
        )
    )

    @property
    def billed_s(self) -> float:
        return self.prior_s + time.monotonic() - self.t0_monotonic

    def cost_usd(self, extra_s: float = 0.0) -> float:
        return self.price_usd_per_hour * (self.billed_s + extra_s) / 3600.0


# a trial that ends before max_steps: its grant ran out, or the sweep is closing (Ctrl-C)
CLOSING = ("budget_stopped", "interrupted")


def _lr_at(step: int, cfg: TrialConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, round(cfg.warmup_fraction * cfg.max_steps))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _batches(encoded: list, batch_size: int, seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        yield [encoded[i] for i in order[:batch_size]]
        del order[:batch_size]


STATE_FILE = "trainer_state.pt"  # next to the adapter in every checkpoint
STATE_VERSION = 1
# what must not differ between a checkpoint's trial and the one resuming from it
_RESUME_KEYS = (*HYPERPARAMETERS, "seed", "batch_size", "max_steps", "warmup_fraction")


@dataclass
class _Progress:
    """What the training loop carries from one interval to the next (and a checkpoint over to
    a resumed attempt)."""

    step: int = 0
    tokens: int = 0
    step_s: float = 5.0  # time estimates: the cfg's priors until measured
    closing_s: float = 30.0


def _save_state(
    out_dir: Path, cfg: TrialConfig, optimizer, progress: _Progress, clock: _Clock
) -> None:
    """Write :data:`STATE_FILE` next to the adapter: all a resumed attempt needs besides it."""
    import torch

    state = {
        "version": STATE_VERSION,
        "config": {k: getattr(cfg, k) for k in _RESUME_KEYS},
        **asdict(progress),
        "billed_s": clock.billed_s,
        "phases_s": dict(clock.phases_s),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if cfg.device == "cuda" else None,
    }
    torch.save(state, Path(out_dir) / STATE_FILE)


def load_state(checkpoint_dir: Path) -> dict:
    """A checkpoint's trainer state (tensors only, no code runs on loading)."""
    import torch

    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a lorasweep checkpoint (no {STATE_FILE})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"{path}: trainer state version {state.get('version')!r}, "
            f"this worker reads {STATE_VERSION}"
        )
    return state


def checkpoint_billed_s(checkpoint_dir: Path) -> float:
    """Billed seconds of the trial when this checkpoint was written (0 without a state)."""
    try:
        return float(load_state(checkpoint_dir)["billed_s"])
    except (FileNotFoundError, ValueError):
        return 0.0


def _check_resumable(cfg: TrialConfig, state: dict) -> None:
    """A checkpoint continues only the trial that wrote it (same config, seed, schedule)."""
    differ = {k: (v, getattr(cfg, k)) for k, v in state["config"].items() if getattr(cfg, k) != v}
    if differ:
        raise ValueError(
            f"resume_from: the checkpoint was written by another trial config {differ} "
            "(checkpoint, this trial)"
        )


def _load_weights(model, checkpoint_dir: Path) -> None:
    """The checkpoint's trained weights into ``model``, in place (the optimizer keeps its
    parameters): the active LoRA adapter, or every weight of a full fine-tune. Weights a full
    save leaves out must be tied to saved ones."""
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no saved weights to resume from")
    weights = {k: v for f in files for k, v in load_file(str(f)).items()}
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
        if result.unexpected_keys:
            raise ValueError(
                f"resume_from: adapter weights this model lacks: {result.unexpected_keys[:5]}"
            )
        return
    result = model.load_state_dict(weights, strict=False)
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in weights if k in own}
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if result.unexpected_keys or untied:
        raise ValueError(
            f"resume_from: weights do not match the model (unexpected "
            f"{result.unexpected_keys[:5]}, missing {untied[:5]})"
        )


def _restore(cfg: TrialConfig, model, optimizer, checkpoint_dir: Path, state: dict) -> _Progress:
    """Weights, optimizer and RNG as the checkpoint left them; returns where the loop goes on."""
    import torch

    _load_weights(model, checkpoint_dir)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if cfg.device == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"])
    return _Progress(
        step=int(state["step"]),
        tokens=int(state["tokens"]),
        step_s=float(state["step_s"]),
        closing_s=float(state["closing_s"]),
    )


def _skip(batches, n: int) -> None:
    """Fast-forward the data order past the ``n`` batches already trained on (one per step)."""
    for _ in range(n):
        next(batches)


_encoded: dict[tuple, list] = {}  # this process's tokenised training sets (reused by later trials)


def _encoded_train_rows(tokenizer, cfg: TrialConfig) -> list:
    """The training rows tokenised; a later trial in this process on the same file, tokenizer and
    length limit reuses them (the file's size and modification time are part of the key)."""
    stat = Path(cfg.train_path).stat() if Path(cfg.train_path).is_file() else None
    key = (cfg.model, cfg.train_path, cfg.data_format, cfg.max_seq_len, cfg.truncation)
    key += (stat.st_size, stat.st_mtime_ns) if stat else ()
    if key not in _encoded:
        rows = read_examples(Path(cfg.train_path), cfg.data_format)
        _encoded.clear()
        _encoded[key] = [
            encode_for_training(tokenizer, ex, cfg.max_seq_len, cfg.truncation) for ex in rows
        ]
    return _encoded[key]


GRAPH_BUCKET_TOKENS = 128  # packed lengths are rounded up to this under CUDA graphs


def _graphs(cfg: TrialConfig, model) -> bool:
    """Compiled layers replaying as CUDA graphs: ``trial.compile`` on a GPU, supported decoders."""
    return cfg.compile and cfg.device == "cuda" and fast.supported(model)


def _setup(cfg: TrialConfig, clock: _Clock):
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.num_threads)
    t = time.monotonic()
    gpu_start.start(cfg.device)  # a fresh process: the GPU starts while the CPU loads
    tokenizer = load_tokenizer(cfg.model)
    model, groups = setup_model(cfg)
    gpu_start.wait()
    if cfg.packing and fast.supported(model):
        packing.enable(fast.causal_lm(model))
    if _graphs(cfg, model):
        fast.compile_layers(model, cuda_graphs=True)
    clock.phases_s["load"] += time.monotonic() - t
    t = time.monotonic()
    train = _encoded_train_rows(tokenizer, cfg)
    val = read_examples(Path(cfg.validation_path), cfg.data_format, "data.validation")
    clock.phases_s["data"] += time.monotonic() - t
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, weight_decay=0.0, fused=cfg.device == "cuda"
    )
    return tokenizer, model, optimizer, train, val[: cfg.eval_examples]


def _train_step(model, rows: list, pad_id: int, cfg: TrialConfig) -> tuple[float, int]:
    """Forward and backward over one batch, in micro-batches when memory asks for it; returns
    (mean loss, tokens processed)."""
    micro = cfg.micro_batch or len(rows)
    use_fast = fast.supported(model)
    packed = use_fast and fast.causal_lm(model).config._attn_implementation == packing.ATTENTION
    graphs = _graphs(cfg, model) and packed
    chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
    total_loss, n_tokens = 0.0, 0
    for chunk in chunks:
        if graphs:  # few distinct shapes, a new iteration for the graph replays
            batch = packing.pack(
                chunk, GRAPH_BUCKET_TOKENS, max(cfg.max_seq_len, GRAPH_BUCKET_TOKENS)
            )
            fast.step_begin()
        else:
            batch = packing.pack(chunk) if packed else pad_batch(chunk, pad_id)
        batch = packing.to_device(batch, cfg.device)
        loss = (fast.loss(model, batch) if use_fast else model(**batch).loss) / len(chunks)
        loss.backward()
        total_loss += loss.detach().item()
        n_tokens += sum(len(ids) for ids, _ in chunk)
    return total_loss, n_tokens


def _gpu_memory(device: str, static_gib: float | None) -> dict:
    """Peak and after-setup GPU memory so far, GiB (empty on CPU)."""
    if device != "cuda":
        return {}
    import torch

    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "static_gib": static_gib}


def _eval_and_save(model, tokenizer, val, cfg: TrialConfig, clock: _Clock, out_dir: Path) -> dict:
    t = time.monotonic()
    eager = fast.eager() if _graphs(cfg, model) else contextlib.nullcontext()
    with eager, lora.merged_for_eval(model) as merged:
        # decoding graphs outlive the eval where the forward reads only weights updated in place
        adapter_free = merged or not hasattr(model, "peft_config")
        result = evaluate.evaluate(
            model,
            tokenizer,
            val,
            cfg.max_seq_len,
            cfg.max_new_tokens,
            cfg.batch_size,
            evaluate.token_allowance(
                cfg.micro_batch or cfg.batch_size, cfg.max_seq_len, cfg.gradient_checkpointing
            ),
            keep_graphs=adapter_free and not _graphs(cfg, model),
            prompt_limit=(
                cfg.max_seq_len - cfg.max_new_tokens if cfg.truncation == "left" else None
            ),
        )
    clock.phases_s["eval"] += time.monotonic() - t
    t = time.monotonic()
    if hasattr(model, "peft_config"):
        lora.save_adapter(model, out_dir)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    clock.phases_s["checkpoint"] += time.monotonic() - t
    model.train()
    return {
        "eval_loss": result["eval_loss"],
        "score": evaluate.score(result["generations"], [e.answer for e in val]),
        "eval_tokens_generated": result["tokens_generated"],
        "eval_decode_steps": result["decode_steps"],
    }


def _needed_usd(clock: _Clock, steps: int, step_s, closings: int, closing_s, release_s) -> float:
    """The trial's cost so far plus, with the safety margin, ``steps`` more steps, ``closings``
    evals and saves, and the billed time until its resources are released."""
    return clock.cost_usd(SAFETY * (steps * step_s + closings * closing_s + release_s))


def _step_fits(clock: _Clock, budget: Budget, left: int, step_s, closing_s, cfg) -> bool:
    """Whether one more step and the closing fit under the ceiling; when they do not (the steps
    ran slower than predicted), the trial first asks for what the ``left`` steps to its next
    eval need, so it is not stopped while the cap still has room for them."""
    if _needed_usd(clock, 1, step_s, 1, closing_s, cfg.release_s) <= budget.ceiling_usd:
        return True
    budget.request(_needed_usd(clock, left, step_s, 1, closing_s, cfg.release_s))
    return _needed_usd(clock, 1, step_s, 1, closing_s, cfg.release_s) <= budget.ceiling_usd


def _room_after_closing(
    clock: _Clock, budget: Budget, step_s, closing_s, next_steps, release_s
) -> bool:
    """Whether, after the coming eval and save, at least one more step and its own closing fit
    under the ceiling (asking for a whole further interval first)."""
    interval = _needed_usd(clock, next_steps, step_s, 2, closing_s, release_s)
    if interval > budget.ceiling_usd:
        budget.request(interval)
    return _needed_usd(clock, 1, step_s, 2, closing_s, release_s) <= budget.ceiling_usd


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or inf: the trial fails (its lr is too high, or the data is bad)."""


def _unpaid_metrics(clock: _Clock, status: str) -> dict:
    """What a trial that trained nothing reports: its bill, no eval, no adapter."""
    return {
        "step": 0,
        "tokens": 0,
        "status": status,
        "billed_s": clock.billed_s,
        "cost_usd": clock.cost_usd(),
        "phases_s": {k: round(v, 3) for k, v in clock.phases_s.items()},
    }


def _startup_fits(
    cfg: TrialConfig, clock: _Clock, budget: Budget, startup_s: float | None = None
) -> bool:
    """Before loading anything: can the predicted startup (``cfg.prior_startup_s`` unless
    ``startup_s``), one step and a closing be paid?"""
    need = _needed_usd(clock, 1, cfg.prior_step_s, 1, cfg.prior_closing_s, cfg.release_s)
    startup_s = cfg.prior_startup_s if startup_s is None else startup_s
    need += clock.price_usd_per_hour * SAFETY * startup_s / 3600.0
    return need <= budget.ceiling_usd or budget.request(need)


def run_trial(
    cfg: TrialConfig,
    report: Callable[[dict, Path], None],
    budget: Budget | None = None,
    resume_from: Path | None = None,
) -> dict:
    """Train one adapter; calls ``report(metrics, adapter_dir)`` after every eval and returns the
    last metrics. ``metrics["status"]`` is ``completed``, ``budget_stopped`` or ``interrupted``; a
    trial refused before its first step (or before loading) reports nothing and returns step 0.

    ``resume_from``: a folder an earlier attempt of this trial reported (its checkpoint): the
    trial continues after that report's step, its reports going on with the next eval's step,
    and its billed seconds from the larger of the checkpoint's and ``cfg.prior_billed_s``."""
    import torch

    state = load_state(resume_from) if resume_from is not None else None
    if state is not None:
        _check_resumable(cfg, state)
    prior_s = max(cfg.prior_billed_s, float(state["billed_s"]) if state else 0.0)
    clock = _Clock(cfg.price_usd_per_hour, cfg.billing_start_monotonic or time.monotonic(), prior_s)
    if state is not None:  # where the earlier attempts' seconds went
        clock.phases_s.update({k: float(v) for k, v in state["phases_s"].items()})
    budget = budget or FixedBudget()
    if not _startup_fits(cfg, clock, budget):
        return _unpaid_metrics(clock, "budget_stopped")
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reuses = model_cache.stats["reuses"]
    tokenizer, model, optimizer, train, val = _setup(cfg, clock)
    model_cache.return_freed_memory()  # what a trial that Tune stopped inside report left
    reused = int(model_cache.stats["reuses"] > reuses)  # base model kept from an earlier trial
    key = cache_key(cfg) if cfg.reuse_base_model else None
    if key is not None:
        model_cache.hold(key, model)
    try:
        progress = _Progress(step_s=cfg.prior_step_s, closing_s=cfg.prior_closing_s)
        if state is not None:
            progress = _restore(cfg, model, optimizer, resume_from, state)
        loaded = (tokenizer, model, optimizer, train, val)
        return _train(cfg, clock, budget, report, loaded, reused, progress)
    finally:
        del optimizer
        if key is not None:
            model_cache.release(key, model)
        del model
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        model_cache.return_freed_memory()


class Work(Protocol):
    """The model's side of :func:`train_loop`: what one step and one closing do. ``run_trial``'s
    is :class:`_Trainer` (this process's model); a packed trial's is its pack host's slot
    (``orchestrator/pack_trial.py``)."""

    def step(self, step: int) -> tuple[float, int, float | None]:
        """Train step ``step + 1``: (loss, tokens, billed seconds to plan the next steps by, or
        None when this step's seconds are not a step time). Raises :class:`NonFiniteLoss`."""
        ...

    def close(self, out_dir: Path, step: int, tokens: int, step_s: float) -> tuple[dict, float]:
        """Evaluate and write the adapter (and what a resume needs) under ``out_dir``: (metrics of
        the eval and of this work, seconds the closing billed)."""
        ...

    def reported(self, seconds: float) -> None:
        """The sweep's ``report`` took ``seconds`` (billed to the trial or not)."""
        ...


class _Trainer:
    """:class:`Work` of ``run_trial``: one optimizer step of this process's model over the next
    batch; a closing evaluates, saves the adapter and the trainer state (a resume's)."""

    def __init__(self, cfg: TrialConfig, clock: _Clock, loaded, reused: int, progress: _Progress):
        import torch

        self.cfg, self.clock, self.reused = cfg, clock, reused
        self.tokenizer, self.model, self.optimizer, train, self.val = loaded
        self.static_gib = torch.cuda.memory_allocated() / 2**30 if cfg.device == "cuda" else None
        self.model.train()
        self.batches = _batches(train, cfg.batch_size, cfg.seed)
        _skip(self.batches, progress.step)

    def step(self, step: int) -> tuple[float, int, float]:
        cfg = self.cfg
        t = time.monotonic()
        for group in self.optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg) * group.get("lr_scale", 1.0)
        faults.before_step(cfg.fault, step + 1)
        rows = next(self.batches)
        loss, n_tokens = _train_step(self.model, rows, self.tokenizer.pad_token_id, cfg)
        loss = faults.loss(cfg.fault, step + 1, loss)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {step + 1}: the trial failed")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.monotonic() - t
        self.clock.phases_s["step"] += dt
        return loss, n_tokens, dt

    def close(self, out_dir: Path, step: int, tokens: int, step_s: float) -> tuple[dict, float]:
        t = time.monotonic()
        metrics = _eval_and_save(
            self.model, self.tokenizer, self.val, self.cfg, self.clock, out_dir
        )
        t_state = time.monotonic()
        # the RNG as the next step will find it: after the eval, like the uninterrupted run
        _save_state(
            out_dir,
            self.cfg,
            self.optimizer,
            _Progress(step, tokens, step_s, t_state - t),
            self.clock,
        )
        self.clock.phases_s["checkpoint"] += time.monotonic() - t_state
        closing_s = time.monotonic() - t
        metrics.update(
            base_model_reused=self.reused, **_gpu_memory(self.cfg.device, self.static_gib)
        )
        return metrics, closing_s

    def reported(self, seconds: float) -> None:
        self.clock.phases_s["report"] += seconds


def _train(cfg, clock, budget, report, loaded, reused, progress: _Progress) -> dict:
    """The training loop of ``run_trial`` once the model is loaded (and, resuming, restored):
    from ``progress.step`` to ``cfg.max_steps``."""
    return train_loop(
        cfg, clock, budget, report, _Trainer(cfg, clock, loaded, reused, progress), progress
    )


def train_loop(cfg, clock, budget, report, work: Work, progress: _Progress | None = None) -> dict:
    """A trial's loop, the same for a trial alone and a packed slot: for each interval up to the
    next eval: ask the grant for it -> steps while one more step and the closing fit under the
    ceiling -> close (``work.close``: eval, adapter) and ``report(metrics, adapter_dir)``. From
    ``progress`` (a resumed attempt's; default: step 0 with ``cfg``'s prior times) to
    ``cfg.max_steps``. ``clock``: the trial's bill (``billed_s``, ``cost_usd(extra_s)``,
    ``phases_s``); a revoked grant closes it without an eval, a closing sweep after one with
    status ``interrupted``. Returns the last report's metrics."""
    if progress is None:
        progress = _Progress(step_s=cfg.prior_step_s, closing_s=cfg.prior_closing_s)
    step, tokens = progress.step, progress.tokens
    step_s, closing_s = progress.step_s, progress.closing_s
    measured = step > 0  # a resumed attempt goes on with its checkpoint's step time
    losses, metrics = [], {}
    status = "completed"
    revoked = False
    if hasattr(budget, "loading"):
        budget.loading = False  # loaded: from here the trial asks for what its steps need
    while step < cfg.max_steps:
        interval = min(cfg.eval_every - step % cfg.eval_every, cfg.max_steps - step)
        need = _needed_usd(clock, interval, step_s, 1, closing_s, cfg.release_s)
        if need > budget.ceiling_usd:
            budget.request(need)  # if refused, train on while the ceiling allows, then close
        start_step = step
        for i in range(interval):
            revoked = bool(getattr(budget, "revoked", False))
            if getattr(budget, "closing", False) and not revoked:
                status = "interrupted"  # the sweep is closing: eval and save what was trained
                break
            if revoked or not _step_fits(clock, budget, interval - i, step_s, closing_s, cfg):
                status = "budget_stopped"  # close now, inside the ceiling
                break
            loss, n_tokens, dt = work.step(step)
            losses.append((step + 1, loss))
            tokens += n_tokens
            if dt is not None:  # None: no step time (a packed first step carries the pack's load)
                step_s = 0.7 * step_s + 0.3 * dt if measured else dt
                measured = True
            step += 1
        if revoked or step == start_step:
            # nothing trained since the last report (or at all): close without an eval; the
            # last report, if any, holds the adapter
            return _closed(metrics, clock, status, step, tokens)
        if status not in CLOSING and step < cfg.max_steps:
            next_interval = min(cfg.eval_every, cfg.max_steps - step)
            if not _room_after_closing(
                clock, budget, step_s, closing_s, next_interval, cfg.release_s
            ):
                status = "budget_stopped"  # this eval is the last: say so in its report
        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            metrics, closing_s = work.close(Path(tmp), step, tokens, step_s)
            done = status in CLOSING or step >= cfg.max_steps
            # the steps since the last report (a close between evals trained fewer than interval)
            since = [(s, loss) for s, loss in losses if s > start_step]
            metrics.update(
                step=step,
                train_loss=sum(v for _, v in since) / max(1, len(since)),
                train_loss_steps=[[s, round(v, 5)] for s, v in since],
                tokens=tokens,
                billed_s=clock.billed_s,
                cost_usd=clock.cost_usd(),
                status=status if done else "running",
                phases_s={k: round(v, 3) for k, v in clock.phases_s.items()},
                step_s=step_s,
                closing_s=closing_s,
            )
            t = time.monotonic()
            report(metrics, Path(tmp))
            work.reported(time.monotonic() - t)
        if status in CLOSING:
            break
    # no metrics: resumed from the last checkpoint, nothing was left to train or report
    return metrics or _closed(metrics, clock, status, step, tokens)


def _closed(metrics: dict, clock: _Clock, status: str, step: int, tokens: int) -> dict:
    """What a trial returns when it closes without a further report: its last report's metrics
    with ``status``, or, with none in this attempt, its bill at the step it reached."""
    if metrics:
        return {**metrics, "status": status}
    return {**_unpaid_metrics(clock, status), "step": step, "tokens": tokens}


def print_report(metrics: dict, adapter_dir: Path) -> None:
    """A ``report`` for runs without Ray."""
    shown = {
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in metrics.items()
        if k not in ("train_loss_steps", "phases_s")
    }
    print(shown, flush=True)


def config_dict(cfg: TrialConfig) -> dict:
    return asdict(cfg)
