"""Peak GPU memory of one training step, predicted from the model's shape (no GPU needed).

peak = weights + trainable state (params, grads, AdamW moments) + activations + logits/loss
       + a fixed allowance for CUDA workspaces.

Byte counts follow what ``workers/train.py`` actually runs:
- lora: base weights in the compute dtype (bf16 on GPU); adapter weights fp32 (PEFT upcasts
  them), so adapter params + grads + 2 AdamW moments = 16 bytes per adapter parameter.
- qlora: linear layers in NF4 with double quantisation (0.5 byte + ~0.127 bit of constants per
  weight); embeddings, norms and the output head stay bf16; adapters as in lora.
- full: every weight bf16 with bf16 AdamW moments (4 bytes per parameter). Gradients (2 more)
  appear during backward as activations are freed and are dropped (``set_to_none``) before the
  next forward, so they add to the peak only with gradient checkpointing (small activations).
Activations are what autograd keeps per token per layer (SDPA attention: no s^2 score matrix):
a base cost in multiples of (hidden, kv width, intermediate), plus, for lora/qlora, a cost per
targeted module proportional to its input width (the bf16 copy of the adapter's input that
autocast keeps, and the dropout mask). The loss computes logits only for answer tokens, at most
``CHUNK_TOKENS`` at a time (``workers/fast.py``). Coefficients were fitted to H100
measurements of the worker's own loop (bench/memory_estimate.py; 0.5B and 1.5B Llama shapes)
and checked on configs not used for the fit (bench/RESULTS.md). With gradient checkpointing each
layer keeps only its bf16 input, plus part of one layer's activations during recomputation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from workers.fast import CHUNK_TOKENS

GIB = 1024**3
NF4_BYTES_PER_WEIGHT = 0.5 + 0.127 / 8
WORKSPACE_BYTES = 0.25 * GIB  # cuBLAS workspaces, allocator rounding
# bytes kept per token per layer, as multiples of (hidden, kv width, intermediate)
FULL_ACT_COEFFS = (22.0, 4.0, 8.0)  # every linear keeps its input for its weight gradient
LORA_ACT_COEFFS = (13.1, 4.0, 6.0)  # frozen base: untargeted linears keep less
# per targeted module, times its input width: the bf16 copy autocast makes of the adapter's input
# (PEFT first casts it to the fp32 adapter dtype; that copy is transient) + the dropout mask
LORA_ACT_BYTES_PER_INPUT = 3.0
CKPT_RECOMPUTE_SHARE = 0.25  # share of one layer's activations alive while recomputing
METHODS = ("lora", "qlora", "full")
LOGIT_BYTES = 10  # per token per vocab entry: bf16 logits + fp32 upcast + fp32 softmax for the loss


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory for a Llama-family decoder."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        return cls(
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one layer."""
        d, kv, f = self.hidden, self.kv_width, self.intermediate
        return {
            "q_proj": (d, d),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (d, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    @property
    def n_linear(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def n_embedding(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def n_params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.n_linear + self.n_embedding + norms

    def _targets(self, targets: list[str] | str) -> list[str]:
        return list(self.linear_shapes()) if targets == "all-linear" else list(targets)

    def lora_input_width(self, targets: list[str] | str) -> int:
        """Sum of the input widths of the targeted projections of one layer."""
        shapes = self.linear_shapes()
        return sum(shapes[n][0] for n in self._targets(targets))

    def n_lora(self, rank: int, targets: list[str] | str) -> int:
        shapes = self.linear_shapes()
        per_layer = sum(rank * (shapes[n][0] + shapes[n][1]) for n in self._targets(targets))
        return self.layers * per_layer


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    trainable_state_gib: float
    activations_gib: float
    logits_gib: float
    workspace_gib: float

    @property
    def total_gib(self) -> float:
        return (
            self.weights_gib
            + self.trainable_state_gib
            + self.activations_gib
            + self.logits_gib
            + self.workspace_gib
        )

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_gib": self.total_gib}


def estimate(
    shape: ModelShape,
    method: str,
    *,
    batch: int,
    seq: int,
    rank: int = 16,
    targets: list[str] | str = "all-linear",
    gradient_checkpointing: bool = False,
    weight_bytes: int = 2,
) -> MemoryEstimate:
    """Predicted peak memory of one training step of ``method`` at ``batch`` x ``seq`` tokens."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    others = shape.n_params - shape.n_linear
    if method == "qlora":
        weights = shape.n_linear * NF4_BYTES_PER_WEIGHT + others * 2
    else:
        weights = shape.n_params * weight_bytes
    if method == "full":
        # two AdamW moments in the weights' dtype; with checkpointing the activations are small
        # and the gradients, complete at the end of backward, are part of the peak
        moments_and_grads = 3 if gradient_checkpointing else 2
        state = shape.n_params * moments_and_grads * weight_bytes
    else:
        state = shape.n_lora(rank, targets) * 16
    tokens = batch * seq
    a, b, c = FULL_ACT_COEFFS if method == "full" else LORA_ACT_COEFFS
    per_token = a * shape.hidden + b * shape.kv_width + c * shape.intermediate
    if method != "full":
        per_token += LORA_ACT_BYTES_PER_INPUT * shape.lora_input_width(targets)
    per_layer = tokens * per_token
    if gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * 2 + CKPT_RECOMPUTE_SHARE * per_layer
    else:
        activations = shape.layers * per_layer
    logits = min(tokens, CHUNK_TOKENS) * shape.vocab * LOGIT_BYTES  # the loss's chunks
    return MemoryEstimate(
        weights / GIB, state / GIB, activations / GIB, logits / GIB, WORKSPACE_BYTES / GIB
    )


def fit_config(
    shape: ModelShape,
    method: str,
    *,
    batch: int,
    seq: int,
    memory_gib: float,
    headroom: float = 0.9,
    **kw,
) -> tuple[int, int, bool, MemoryEstimate] | None:
    """The cheapest way to run ``batch`` x ``seq`` within ``headroom`` x ``memory_gib``:
    (micro_batch, accumulation_steps, gradient_checkpointing, estimate), trying as-is, then
    gradient checkpointing, then halving the micro-batch; ``None`` when nothing fits."""
    limit = headroom * memory_gib
    micro = batch
    while micro >= 1:
        for ckpt in (False, True):
            est = estimate(shape, method, batch=micro, seq=seq, gradient_checkpointing=ckpt, **kw)
            if est.total_gib <= limit:
                return micro, batch // micro, ckpt, est
        if micro == 1:
            return None
        micro //= 2
        while batch % micro:
            micro -= 1
    return None


def estimate_pack(
    shape: ModelShape,
    method: str,
    slots: list[tuple[int, list[str] | str]],
    *,
    batch: int,
    seq: int,
    gradient_checkpointing: bool = False,
    weight_bytes: int = 2,
) -> MemoryEstimate:
    """Predicted peak of one step of a pack (``workers/packed.py``): the base weights once, and
    for each slot ``(rank, targets)`` its adapter with grads and AdamW moments and the
    activations of its ``batch`` x ``seq`` tokens. The loss runs slot after slot, one
    checkpointed chunk at a time, so the logits are one slot's chunk, as for a trial alone."""
    if method not in ("lora", "qlora"):
        raise ValueError(f"a pack trains adapters only (lora, qlora), got {method!r}")
    if not slots:
        raise ValueError("a pack needs at least one slot")
    each = [
        estimate(
            shape,
            method,
            batch=batch,
            seq=seq,
            rank=rank,
            targets=targets,
            gradient_checkpointing=gradient_checkpointing,
            weight_bytes=weight_bytes,
        )
        for rank, targets in slots
    ]
    return MemoryEstimate(
        weights_gib=each[0].weights_gib,
        trainable_state_gib=sum(e.trainable_state_gib for e in each),
        activations_gib=sum(e.activations_gib for e in each),
        logits_gib=max(e.logits_gib for e in each),
        workspace_gib=each[0].workspace_gib,
    )


def pick_pack_size(
    shape: ModelShape,
    method: str,
    *,
    batch: int,
    seq: int,
    memory_gib: float,
    rank: int = 16,
    targets: list[str] | str = "all-linear",
    max_slots: int = 8,
    headroom: float = 0.9,
    gradient_checkpointing: bool = False,
) -> int:
    """The largest K <= ``max_slots`` whose pack of K slots of ``rank``/``targets`` fits within
    ``headroom`` x ``memory_gib`` (0: not even one slot fits). Size the slots as the largest
    rank the search space may draw: a refilled slot must fit too."""
    limit = headroom * memory_gib
    best = 0
    for k in range(1, max_slots + 1):
        est = estimate_pack(
            shape,
            method,
            [(rank, targets)] * k,
            batch=batch,
            seq=seq,
            gradient_checkpointing=gradient_checkpointing,
        )
        if est.total_gib > limit:
            break
        best = k
    return best
