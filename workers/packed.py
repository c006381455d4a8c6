"""Several LoRA trials packed on one frozen base: one forward and backward over all their rows.

Trials run as separate processes on one GPU only time-slice it, each with its own copy of the base
(measured: K=2 and 4 processes gave 0.95x / 0.94x the tokens/s of one). A :class:`Pack` holds the
base once and K adapter *slots*, each one trial with its own rank, alpha, target modules, dropout,
rsLoRA flag, optimizer, learning rate and schedule. One :meth:`Pack.step`:

1. lays the active slots' rows end to end in one padding-free row (``workers/packing.py``), slot
   after slot, so each slot owns a contiguous span of tokens; attention stays inside each row;
2. runs every base matmul once over all the rows (one copy of the weights, big matmuls);
3. adds each slot's LoRA update only to its own span (:class:`PackedLinear`);
4. gives each slot its own loss (mean over its own labelled tokens, chunked as in
   ``workers/fast.py``), backpropagates their sum, and steps each slot's own AdamW with its own
   learning rate from its own schedule (``workers/train.py``'s ``_lr_at``).

Rows never see each other (attention is per row, LoRA per span, the base is frozen), so a slot's
gradient is exactly the gradient of its own loss: it trains as it would alone
(``tests/test_packing.py``: equal to ``run_trial`` on CPU in float32). Slots are added
(:meth:`Pack.add`) and removed (:meth:`Pack.remove`) between steps without touching the base; a
step returns each slot's token count, by which the GPU's held seconds are billed.

Dropout masks come from torch's global generator in module order, as PEFT's do: a pack of one
slot draws exactly the masks of the trial alone; in a larger pack a slot's masks depend on its
neighbours' (same distribution, other draws). DoRA and full fine-tuning run unpacked.

A slot's adapter is saved as PEFT saves an adapter named "default" (``Pack.save``): evaluation,
promotion and serving read it like any trial's. :class:`HoldBilling` bills every second the pack's
GPU is held to its slots, by their share of each step's tokens.

Measured on an H200 (``bench/packing.py``, bench/RESULTS.md): at batch 8 x 1024 per slot a pack of
4 runs at the tokens/s of the same trials one after another (0.5B: 126.6k vs 127.2k): one trial's
step is already GPU-bound at 8k tokens (LoRA-MFU ~26% is lost in per-token work, not in launches),
so sharing the base matmuls saves no time there; it peaks at 0.80x the memory of four separate
trials (activations dominate). Packing pays where one trial's step is small (short rows, small
batches: 8 x 256 tokens per trial gave 76k tokens/s packed by 4 against 59-74k one by one, before
the split below). Each span is one piece of a single split of
the layer's input and output: slicing per span cost a full-size copy per slot in backward
(O(K^2) per layer; tokens/s fell with K).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from workers import fast, faults, packing
from workers.lora import TARGET_MODULES

METHODS = ("lora", "qlora")  # the base is shared, so only adapters may train


class PackError(Exception):
    """A trial cannot join a pack; the message says why and what runs it instead."""


@dataclass
class _Routing:
    """Which tokens each slot owns in the current step, shared by every :class:`PackedLinear`:
    ``spans`` ((slot, start, end) along the token axis) while training, or ``only``: one slot's
    adapter on every token (evaluation and generation of that slot)."""

    spans: tuple = ()
    only: str | None = None


def _torch_modules():
    import torch

    class LoRA(torch.nn.Module):
        """One slot's update for one linear layer: ``B(A(dropout(x))) * scaling`` (PEFT's)."""

        def __init__(self, in_features, out_features, rank, scaling, dropout, device):
            super().__init__()
            kw = {"bias": False, "device": device, "dtype": torch.float32}  # the master copy
            self.lora_A = torch.nn.Linear(in_features, rank, **kw)
            self.lora_B = torch.nn.Linear(rank, out_features, **kw)
            self.scaling = scaling
            self.dropout = dropout

        def _input(self, x):
            autocast = torch.is_autocast_enabled(x.device.type)
            if not (autocast and self.dropout == 0.0):
                # PEFT casts the input to the adapter's dtype; under autocast with no dropout the
                # matmul casts it straight back (exactly), so the float32 copy is skipped
                x = x.to(self.lora_A.weight.dtype)
            if self.dropout > 0.0:
                x = torch.nn.functional.dropout(x, self.dropout, self.training)
            return x

        def forward(self, x):
            return self.lora_B(self.lora_A(self._input(x))) * self.scaling

        def added(self, y, x):
            """``y + B(A(dropout(x))) * scaling``, the add inside the matmul (one kernel, no pass
            over ``y`` of its own); ``y`` and ``x`` are [tokens, features]."""
            u = self.lora_A(self._input(x))
            b = self.lora_B.weight.t()
            return torch.addmm(y, u.to(y.dtype), b.to(y.dtype), alpha=self.scaling)

    class PackedLinear(torch.nn.Module):
        """A frozen base linear layer plus the adapters of the slots that target it, each added
        to its own slot's tokens only."""

        def __init__(self, base, routing: _Routing):
            super().__init__()
            self.base = base
            self.adapters = torch.nn.ModuleDict()
            self.routing = routing

        def forward(self, x):
            y = self.base(x)
            routing = self.routing
            if routing.only is not None:
                if routing.only not in self.adapters:
                    return y
                return (y + self.adapters[routing.only](x)).to(y.dtype)
            spans = routing.spans
            if not any(slot in self.adapters for slot, _, _ in spans):
                return y  # no slot of this step targets this layer
            # A training step's rows are packed into one row, the slots' spans laid end to end
            # from its first token. One split of input and output (its backward: one cat) and one
            # cat of the pieces: slicing or in-place adds per span would each cost a full-size
            # copy in backward, K of them per layer (measured: tokens/s fell with K).
            out, flat = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
            sizes = [end - start for _, start, end in spans]
            tail = out.shape[0] - spans[-1][2]
            if tail:  # tokens of no slot
                sizes.append(tail)
            ys, xs = out.split(sizes), flat.split(sizes)
            pieces = [
                self.adapters[slot].added(ys[i], xs[i]) if slot in self.adapters else ys[i]
                for i, (slot, _, _) in enumerate(spans)
            ]
            if tail:
                pieces.append(ys[-1])
            joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            return joined.view(y.shape)

    return LoRA, PackedLinear


@dataclass
class Slot:
    """One trial in a pack: its config, adapter parameters, optimizer and progress."""

    key: str
    cfg: object  # workers.train.TrialConfig
    params: list
    optimizer: object
    layers: list[str]  # names of the linear layers it adapts, in module order
    step: int = 0
    tokens: int = 0
    losses: list = field(default_factory=list)  # (step, loss) so far


@dataclass(frozen=True)
class PackedBatch:
    """A step's rows packed into one row (``workers/packing.py``'s keys, on the CPU), each slot's
    (key, start, end) span of its tokens, and each slot's own token count (fillers left out)."""

    batch: dict
    spans: tuple
    tokens: dict


def _pack_rows(rows: list, max_length: int | None) -> dict:
    """What ``packing.pack(rows, max_length=...)`` returns, built with tensor ops instead of
    Python lists (1.7x faster: a pack of 8 slots is 64k tokens)."""
    import torch

    lengths = torch.tensor([len(ids) for ids, _ in rows])
    ids = torch.tensor(list(itertools.chain.from_iterable(ids for ids, _ in rows)))
    labels = torch.tensor(list(itertools.chain.from_iterable(lab for _, lab in rows)))
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:])
    starts = cu[:-1].long()
    labels[starts[lengths > 0]] = -100  # no row learns to predict its successor's first token
    positions = torch.arange(int(cu[-1])) - torch.repeat_interleave(starts, lengths)
    longest = max(int(lengths.max()), max_length or 0)
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": positions[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


@dataclass(frozen=True)
class SlotStep:
    """What one step did for one slot: its loss and the tokens of its rows (its share of the
    step, for billing)."""

    loss: float
    tokens: int


def _targets(name: str) -> list[str] | str:
    if name not in TARGET_MODULES:
        raise PackError(f"search_space.target_modules: unknown set {name!r}; use {TARGET_MODULES}")
    return TARGET_MODULES[name]


class Pack:
    """A frozen base model shared by K LoRA slots (see the module's docstring).

    Args:
        model: a causal LM (not a PEFT model) of a family ``workers/fast.py`` supports; its
            decoder's linear layers are wrapped in place, its weights frozen.
        device: "cuda" or "cpu" (where ``model`` is).
        method: "lora" (base in the compute dtype) or "qlora" (base in NF4); a slot's method must
            be the pack's.
        compile: compile the decoder layers and replay them as CUDA graphs (GPU). Each distinct
            layout of slot spans compiles once: keep ``bucket_tokens`` so that layouts repeat.
        bucket_tokens: each slot's span is rounded up to a multiple of this with a filler row (no
            labels); None: no rounding. Under CUDA graphs this keeps the shapes few.
        max_length: the longest-row bound given to the attention (fixed: fewer shapes).
        gradient_checkpointing: recompute each layer in backward (less memory, ~30% more time).
    """

    def __init__(
        self,
        model,
        *,
        device: str = "cpu",
        method: str = "lora",
        compile: bool = False,
        bucket_tokens: int | None = None,
        max_length: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        import torch

        lm = fast.causal_lm(model)
        if hasattr(model, "peft_config"):
            raise PackError("Pack takes the bare base model, not a PEFT model")
        if not fast.supported(lm) or not packing.enable(lm):
            raise PackError(
                f"model type {lm.config.model_type!r} cannot be packed (needs one of "
                f"{sorted(fast.SUPPORTED)} without sliding-window attention): run trials unpacked"
            )
        if method not in METHODS:
            raise PackError(f"pack method must be one of {METHODS}, got {method!r}")
        self.model, self.device, self.method = lm, device, method
        self.bucket_tokens, self.max_length = bucket_tokens, max_length
        self.routing = _Routing()
        self.slots: dict[str, Slot] = {}
        for p in lm.parameters():
            p.requires_grad_(False)
        _, PackedLinear = _torch_modules()
        decoder = lm.get_decoder()
        self.layers: dict[str, object] = {}  # full module name -> PackedLinear, module order
        prefix = next(n for n, m in lm.named_modules() if m is decoder)
        for name, module in list(decoder.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = decoder.get_submodule(parent_name) if parent_name else decoder
                wrapped = PackedLinear(module, self.routing)
                setattr(parent, child, wrapped)
                full = f"{prefix}.{name}" if prefix else name
                self.layers[full] = wrapped
        if not self.layers:
            raise PackError("the model's decoder has no linear layers to adapt")
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.enable_input_require_grads()  # frozen embeddings: gradients must reach layer inputs
        self.graphs = compile and device == "cuda"
        if self.graphs:
            fast.compile_layers(lm, cuda_graphs=True)
        lm.train()

    @classmethod
    def load(
        cls, ref: str, *, dtype: str = "auto", device: str = "cpu", method: str = "lora", **kw
    ) -> Pack:
        """A pack over the base model ``ref`` (bf16 on GPU, float32 on CPU; NF4 for qlora)."""
        if method == "qlora":
            return cls(_load_nf4(ref, device), device=device, method="qlora", **kw)
        from workers.model import load_base_model

        return cls(load_base_model(ref, dtype, device), device=device, method=method, **kw)

    # slots --------------------------------------------------------------------------------

    def add(self, cfg) -> str:
        """Add a trial (a ``TrialConfig``) as a new slot with a fresh adapter drawn from its seed
        (as ``workers/lora.py`` draws it); returns the slot's key. The base is not touched."""
        import torch

        if cfg.method != self.method or cfg.use_dora:
            raise PackError(
                f"trial method {cfg.method!r}{' with DoRA' if cfg.use_dora else ''} cannot join a "
                f"{self.method} pack: full fine-tuning and DoRA run unpacked"
            )
        if cfg.micro_batch and cfg.micro_batch < cfg.batch_size:
            raise PackError(
                "trial.micro_batch: a pack steps each slot's whole batch; pick a smaller K "
                "(workers.memory.pick_pack_size) instead of accumulating"
            )
        targets = _targets(cfg.target_modules)
        chosen = [
            name
            for name in self.layers
            if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets
        ]
        if not chosen:
            raise PackError(
                f"search_space.target_modules: {cfg.target_modules!r} matches no layer of this "
                "model; use all_linear"
            )
        # the lowest free key: a refilled slot keeps the module names of the one it replaces, so
        # compiled layers see the same structure (fewer recompiles)
        key = next(f"slot{i}" for i in itertools.count() if f"slot{i}" not in self.slots)
        LoRA, _ = _torch_modules()
        scaling = cfg.alpha / (math.sqrt(cfg.rank) if cfg.use_rslora else cfg.rank)
        generators: dict = {}  # one stream per device, as workers.lora.init_adapter draws
        params_a, params_b = [], []
        with torch.no_grad():
            for name in chosen:
                layer = self.layers[name]
                base = layer.base
                adapter = LoRA(
                    base.in_features,
                    base.out_features,
                    cfg.rank,
                    scaling,
                    cfg.dropout,
                    self._weight_device(base),
                )
                a = adapter.lora_A.weight
                if a.device not in generators:
                    generators[a.device] = torch.Generator(device=a.device).manual_seed(cfg.seed)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generators[a.device])
                torch.nn.init.zeros_(adapter.lora_B.weight)
                adapter.train()
                layer.adapters[key] = adapter
                params_a.append(a)
                params_b.append(adapter.lora_B.weight)
        params = [p for pair in zip(params_a, params_b, strict=True) for p in pair]
        if cfg.loraplus_lr_ratio:  # LoRA+: B trains faster, as workers/methods.py groups it
            groups = [
                {"params": params_a, "lr_scale": 1.0},
                {"params": params_b, "lr_scale": float(cfg.loraplus_lr_ratio)},
            ]
        else:
            groups = [{"params": params, "lr_scale": 1.0}]
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, weight_decay=0.0, fused=self.device == "cuda"
        )
        self.slots[key] = Slot(key, cfg, params, optimizer, chosen)
        if len(self.slots) == 1:
            torch.manual_seed(cfg.seed)  # alone in the pack: dropout draws as the trial alone
        return key

    def remove(self, key: str) -> None:
        """Take a slot out (its trial finished, was pruned or failed): its adapter and optimizer
        state are freed; the base and the other slots are untouched."""
        slot = self.slots.pop(key)
        for name in slot.layers:
            del self.layers[name].adapters[key]
        slot.optimizer.state.clear()
        slot.params.clear()

    @staticmethod
    def _weight_device(base):
        return base.weight.device

    # training -----------------------------------------------------------------------------

    def prepare(self, rows_by_slot: dict) -> PackedBatch:
        """The packed batch of the slots' rows (key -> list of (ids, labels)), on the CPU: what
        :meth:`step` takes (it also takes the rows themselves)."""
        unknown = set(rows_by_slot) - set(self.slots)
        if unknown:
            raise KeyError(f"no such slots in this pack: {sorted(unknown)}")
        rows, spans, tokens, at = [], [], {}, 0
        for key, slot_rows in rows_by_slot.items():
            slot_rows = list(slot_rows)
            if not slot_rows:
                continue  # this slot idles this step
            n = tokens[key] = sum(len(ids) for ids, _ in slot_rows)
            filler = -n % self.bucket_tokens if self.bucket_tokens else 0
            if filler:  # no labels, attends only to itself
                slot_rows.append(([0] * filler, [-100] * filler))
            rows += slot_rows
            spans.append((key, at, at + n + filler))
            at += n + filler
        return PackedBatch(_pack_rows(rows, self.max_length) if rows else {}, tuple(spans), tokens)

    def _losses(self, batch: dict, spans: tuple) -> list:
        """Each slot's mean cross-entropy over its own labelled tokens (``fast.loss`` per span)."""
        import torch
        from torch.utils.checkpoint import checkpoint

        lm = self.model
        extra = {k: batch[k] for k in fast.PACKED_KEYS}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            hidden = lm.get_decoder()(
                input_ids=batch["input_ids"], use_cache=False, **extra
            ).last_hidden_state
        hidden, labels = hidden[0, :-1], batch["labels"][0, 1:]  # position t predicts t + 1
        losses = []
        for _, start, end in spans:
            h, lab = hidden[start:end], labels[start:end]
            keep = lab != -100
            h, targets = h[keep], lab[keep]
            total = h.sum().float() * 0.0  # differentiable even when nothing is labelled
            for i in range(0, targets.numel(), fast.CHUNK_TOKENS):
                total = total + checkpoint(
                    fast._chunk_loss,
                    lm.get_output_embeddings(),
                    h[i : i + fast.CHUNK_TOKENS],
                    targets[i : i + fast.CHUNK_TOKENS],
                    use_reentrant=False,
                )
            losses.append(total / max(targets.numel(), 1))
        return losses

    def step(self, rows_by_slot: dict | PackedBatch) -> dict[str, SlotStep]:
        """One optimizer step of every slot in ``rows_by_slot`` (key -> its batch of (ids,
        labels) rows, or what :meth:`prepare` made of them); slots left out idle this step. A
        slot whose loss is not finite is not stepped (its loss says so: the caller fails that
        trial and removes it)."""
        import torch

        from workers.train import _lr_at

        prepared = rows_by_slot if isinstance(rows_by_slot, PackedBatch) else None
        prepared = prepared or self.prepare(rows_by_slot)
        if not prepared.spans:
            return {}
        batch, spans = packing.to_device(prepared.batch, self.device), prepared.spans
        if self.graphs:
            fast.step_begin()
        self.routing.spans = spans
        try:
            losses = self._losses(batch, spans)
            torch.stack(losses).sum().backward()
        finally:
            self.routing.spans = ()
        values = torch.stack([loss.detach() for loss in losses]).tolist()  # one sync
        out = {}
        for (key, _, _), value in zip(spans, values, strict=True):
            slot = self.slots[key]
            n_tokens = prepared.tokens[key]
            if math.isfinite(value):
                for group in slot.optimizer.param_groups:
                    group["lr"] = _lr_at(slot.step, slot.cfg) * group.get("lr_scale", 1.0)
                slot.optimizer.step()
            slot.optimizer.zero_grad(set_to_none=True)
            slot.step += 1
            slot.tokens += n_tokens
            slot.losses.append((slot.step, value))
            out[key] = SlotStep(value, n_tokens)
        return out

    # evaluation and saving ------------------------------------------------------------------

    @contextlib.contextmanager
    def only(self, key: str):
        """Within the block the model is slot ``key``'s trial: its adapter on every token, any
        input shape (evaluation, generation); compiled layers run eagerly."""
        if key not in self.slots:
            raise KeyError(key)
        eager = fast.eager() if self.graphs else contextlib.nullcontext()
        self.routing.only = key
        try:
            with eager:
                yield self.model
        finally:
            self.routing.only = None
            self.model.train()

    def adapter_state(self, key: str) -> dict:
        """Slot ``key``'s weights under the names PEFT saves them with."""
        state = {}
        for name in self.slots[key].layers:
            adapter = self.layers[name].adapters[key]
            state[f"base_model.model.{name}.lora_A.weight"] = adapter.lora_A.weight
            state[f"base_model.model.{name}.lora_B.weight"] = adapter.lora_B.weight
        return state

    def save(self, key: str, out_dir) -> None:
        """Slot ``key``'s adapter as PEFT saves an adapter named "default"
        (``adapter_config.json``, ``adapter_model.safetensors``)."""
        from pathlib import Path

        from peft import LoraConfig
        from safetensors.torch import save_file

        cfg = self.slots[key].cfg
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.adapter_state(key).items()}
        save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        names = sorted({n.rsplit(".", 1)[-1] for n in self.slots[key].layers})
        config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=names,
            task_type="CAUSAL_LM",
            bias="none",
            use_rslora=cfg.use_rslora,
            inference_mode=True,
            base_model_name_or_path=self.model.__dict__.get("name_or_path"),
        )
        config.save_pretrained(str(out))

    def token_shares(self, result: dict[str, SlotStep]) -> dict[str, float]:
        """Each slot's share of a step's tokens (what its trial is billed of the step's time)."""
        total = sum(s.tokens for s in result.values())
        return {k: (s.tokens / total if total else 1.0 / len(result)) for k, s in result.items()}


def _load_nf4(ref: str, device: str):
    """The base quantised to NF4 with double quantisation and bf16 compute (QLoRA's recipe)."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        raise PackError("a qlora pack needs a CUDA GPU (bitsandbytes 4-bit); use lora on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PackError("a qlora pack needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        ref,
        quantization_config=quant,
        dtype=torch.bfloat16,
        device_map={"": 0},
        attn_implementation="sdpa",
    )


class HoldBilling:
    """Every second a pack's GPU is held, billed to its slots (on this process's monotonic clock).

    ``settle(shares)`` bills the seconds since the last settlement to the slots in ``shares``
    (key -> weight: a step's tokens from :meth:`Pack.token_shares`, or ``{key: 1}`` after that
    slot's eval and save). Seconds with no slot to bill (loading the base, an empty pack) wait and
    go to the next settlement's slots, as a trial alone pays its own load. So at every settlement
    the seconds billed (to slots in the pack, and ``closed_s`` to trials that left) add up to the
    time held since ``start_monotonic``.
    """

    def __init__(
        self, start_monotonic: float | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self._clock = clock
        self.start_monotonic = clock() if start_monotonic is None else start_monotonic
        self._last = self.start_monotonic
        self.pending_s = 0.0  # held, not yet billed to any slot
        self.billed_s: dict[str, float] = {}  # slots in the pack
        self.closed_s = 0.0  # billed to trials that left

    def settle(self, shares: dict[str, float]) -> dict[str, float]:
        """Bill the time since the last settlement (and any pending) by ``shares``; returns the
        seconds billed to each slot now."""
        now = self._clock()
        self.pending_s += now - self._last
        self._last = now
        total = sum(w for w in shares.values() if w > 0)
        if total <= 0:
            return {}  # nobody to bill yet: the seconds wait for the next settlement
        billed = {k: self.pending_s * w / total for k, w in shares.items() if w > 0}
        for key, seconds in billed.items():
            self.billed_s[key] = self.billed_s.get(key, 0.0) + seconds
        self.pending_s = 0.0
        return billed

    def close(self, key: str) -> float:
        """A slot's trial ended: its billed seconds, moved to ``closed_s`` (its key may be
        reused by the next trial)."""
        seconds = self.billed_s.pop(key, 0.0)
        self.closed_s += seconds
        return seconds

    def held_s(self) -> float:
        """Seconds held so far (billed or pending)."""
        return self._clock() - self.start_monotonic

    def unsettled_s(self) -> float:
        """Held seconds not billed to any slot yet: pending, and since the last settlement."""
        return self.pending_s + max(0.0, self._clock() - self._last)

    def live_s(self, busy: dict[str, float]) -> dict[str, float]:
        """Each slot's bill as of now, without settling: its billed seconds, plus, for the slots
        of the GPU call in flight (``busy``: key -> weight, as ``settle`` takes), their share of
        the seconds since the last settlement (what the call's end will bill them). Read without
        a lock from another thread (a hung step holds the pack's): a watchdog's view of a
        call that may never end."""
        billed = dict(self.billed_s)
        total = sum(w for w in busy.values() if w > 0)
        if total > 0:
            unsettled = self.unsettled_s()
            for key, w in busy.items():
                if w > 0:
                    billed[key] = billed.get(key, 0.0) + unsettled * w / total
        return billed


class PackServer:
    """A pack shared by concurrent trials, each in its own thread (what a threaded Ray actor's
    calls are): a trial ``join``s, hands in one batch per ``step`` and blocks until the packed
    step that includes it has run. A step runs once every joined slot has handed in its rows, or
    ``wait_s`` after the first did (a slot busy evaluating is not waited for). Evaluation and
    saving of one slot (``closing``) hold the pack alone: the routing is the pack's, not a
    thread's. Every held second is billed to the slots (``billing``)."""

    def __init__(self, pack: Pack, *, wait_s: float = 0.05, billing: HoldBilling | None = None):
        import threading

        self.pack = pack
        self.wait_s = wait_s
        self.billing = billing or HoldBilling()
        self._cond = threading.Condition()
        self._gpu = threading.Lock()  # one packed step or one slot's closing at a time
        self._pending: dict[str, list] = {}
        self._results: dict[str, SlotStep | BaseException] = {}
        self._first_pending: float | None = None
        self.step_sizes: dict[int, int] = {}  # slots per packed step -> steps run
        # the GPU call in flight (a packed step or one slot's closing): its slots' weights
        # (``HoldBilling.settle``'s) and when it began; read by ``live`` from other threads
        self.busy: dict[str, float] = {}
        self.busy_since: float | None = None

    # lock order: the condition, then the GPU (a closing holds only the GPU)

    def join(self, cfg) -> str:
        with self._cond, self._gpu:
            return self.pack.add(cfg)

    def leave(self, key: str) -> float:
        """Remove the slot; returns the seconds billed to it (the time since the last
        settlement included: its closing's tail). Seconds held after the last slot left wait in
        ``billing.pending_s`` for the next slot, or for the caller to bill as the pack's idle
        tail."""
        with self._cond, self._gpu:
            self.billing.settle({key: 1.0})
            self.pack.remove(key)
            # rows it handed in (a trial stopped from outside mid-step) go with it
            self._pending.pop(key, None)
            self._results.pop(key, None)
            if not self._pending:
                self._first_pending = None
            self._cond.notify_all()  # its waiting step, if any, learns it left
            return self.billing.close(key)

    def step(self, key: str, rows: list) -> SlotStep:
        """Hand in this slot's batch; returns its loss and tokens once its step has run."""
        if not rows:
            raise ValueError("PackServer.step: a batch needs at least one row")
        with self._cond:
            slot = self.pack.slots.get(key)  # a refilled key is another slot: not this step's
            if slot is None:
                raise KeyError(f"no slot {key} in this pack")
            self._pending[key] = rows
            if self._first_pending is None:
                self._first_pending = time.monotonic()
            while True:
                if self.pack.slots.get(key) is not slot:
                    raise KeyError(f"slot {key} left the pack during its step")
                if key in self._results:
                    break
                waited = time.monotonic() - self._first_pending
                if len(self._pending) >= len(self.pack.slots) or waited >= self.wait_s:
                    self._run_pending()
                else:
                    self._cond.wait(self.wait_s - waited)
            result = self._results.pop(key)
        if isinstance(result, BaseException):
            raise result  # the packed step failed: every trial in it sees why
        return result

    def _run_pending(self) -> None:
        """The step of what was handed in (called under the condition's lock)."""
        batch, self._pending, self._first_pending = self._pending, {}, None
        try:
            with self._gpu:
                prepared = self.pack.prepare(batch)
                self._begin({k: float(n) for k, n in prepared.tokens.items()})
                try:
                    # fault injection (tests, off by default): a hang here is a hung packed step
                    faults.before_packed_step(
                        [
                            (getattr(s.cfg, "fault", None), s.step + 1)
                            for k in batch
                            if (s := self.pack.slots.get(k))
                        ]
                    )
                    result = self.pack.step(prepared)
                    self.step_sizes[len(result)] = self.step_sizes.get(len(result), 0) + 1
                    self.billing.settle(self.pack.token_shares(result))
                finally:
                    self._begin({})
        except Exception as exc:  # noqa: BLE001 - handed to every waiting trial
            result = dict.fromkeys(batch, exc)
        self._results.update(result)
        self._cond.notify_all()

    @contextlib.contextmanager
    def closing(self, key: str):
        """The pack's model as slot ``key``'s trial, for its eval and adapter save; the time is
        billed to that slot."""
        with self._gpu, self.pack.only(key) as model:
            self._begin({key: 1.0})
            try:
                yield model
            finally:
                self.billing.settle({key: 1.0})
                self._begin({})

    def _begin(self, busy: dict[str, float]) -> None:
        """The GPU call now in flight (under the GPU lock): its slots' weights; {} when done."""
        self.busy_since = time.monotonic() if busy else None
        self.busy = busy

    def live(self) -> tuple[dict[str, float], dict[str, float], float]:
        """Without a lock (a hung step holds them): each slot's bill as of now
        (``HoldBilling.live_s``), the slots of the GPU call in flight and how long it has run
        (0 when none)."""
        busy, since = self.busy, self.busy_since
        running_s = 0.0 if since is None else time.monotonic() - since
        return self.billing.live_s(busy), dict(busy), running_s
