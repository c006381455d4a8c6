"""Decoding steps of fixed shape, replayed as a CUDA graph (evaluation on a GPU).

A decoding step of a small model with a LoRA adapter is bound by kernel launches and Python, not
by the GPU: on the H100 a step of the 135M demo model took ~55 ms eagerly, of which the GPU was
busy a small part. Replaying the step as a CUDA graph launches it all at once. A graph needs
every shape and address fixed, so here:

- ``StaticKV`` is a KV cache of fixed length whose ``update`` writes each row's new keys and
  values at that row's own positions (a scatter along the sequence, positions from a fixed
  tensor) and returns the whole buffers. A row's position p always holds its token p: rejected
  guesses are overwritten by the next step, which writes from the first position not kept.
- The attention mask is causal by position (key position <= query position, per row): every key
  a query may see is the row's prompt, its kept tokens, or this step's own earlier tokens.
  Positions past what a row has kept (right padding, rejected guesses) lie beyond its queries or
  are rewritten by the step itself before its attention reads them.
- Every step feeds all rows ``width`` tokens (finished rows and short guesses are padded; what
  they compute is ignored), so one graph serves every step of a batch.

It is duck-typed against transformers' cache interface (``update`` and ``get_seq_length``), and
the mask is passed as a 4D tensor, which transformers uses as it is, so none of its cache or mask
internals (which differ between 5.x releases) are involved. The same class runs eagerly on any
device; tests check the tokens against ``generate`` on CPU, and on CUDA with the graph.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

# steps run eagerly before the one that also captures the graph. 0: the first step runs eagerly
# (the capture's warm-up) and is captured; the H100 eval profile (seventh session) showed the extra
# eager step cost 0.05-0.15 s of a ~0.4 s eval, with the same generations
EAGER_STEPS = 0
# A graph may outlive its decoding run (``keep``): the next eval of the same model and shape, in
# this trial or the worker's next one, replays it without capturing again. Callers keep graphs
# only where the forward reads nothing but weights updated in place (an adapter merged into the
# base, or full fine-tuning) and no compiled layers record CUDA graphs of their own in between:
# with ``trial.compile`` a kept graph's replay after compiled training steps hit an illegal memory
# access on the H100 (fifth session).
KEEP_MEMORY_FRACTION = 0.02  # most of the GPU's memory a kept cache may hold between evals (the
# memory check keeps 10% of it free for what its estimate leaves out: this takes a fifth at most)


class StaticKV:
    """A fixed-length KV cache, allocated on first use from the first keys' shape."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.keys: list = []
        self.values: list = []
        self.write = None  # [rows, tokens] positions the current forward's tokens go to

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # callers always pass positions and a 4D mask

    def update(self, keys, values, layer_idx: int, cache_kwargs=None, **_):
        # transformers <= 5.23 passes ``cache_kwargs``, 5.24 ``kwargs=``: neither is needed here
        import torch

        if layer_idx == len(self.keys):
            rows, heads, _, dim = keys.shape
            shape = (rows, heads, self.length, dim)
            self.keys.append(torch.zeros(shape, dtype=keys.dtype, device=keys.device))
            self.values.append(torch.zeros(shape, dtype=values.dtype, device=values.device))
        index = self.write[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        self.keys[layer_idx].scatter_(2, index, keys)
        self.values[layer_idx].scatter_(2, index, values)
        return self.keys[layer_idx], self.values[layer_idx]

    def select(self, index) -> None:
        """Keep only the batch rows ``index`` (a list)."""
        import torch

        at = torch.tensor(index, device=self.keys[0].device)
        self.keys = [k.index_select(0, at) for k in self.keys]
        self.values = [v.index_select(0, at) for v in self.values]

    def mask(self, positions):
        """[rows, 1, tokens, length] bool: each token sees its row's positions up to its own."""
        import torch

        keys = torch.arange(self.length, device=positions.device)
        return keys[None, None, None, :] <= positions[:, None, :, None]


def forward(decoder, kv: StaticKV, ids, positions):
    """The decoder's last hidden states for ``ids`` at ``positions``, writing their keys and
    values into ``kv`` at the same positions."""
    from workers import fast

    kv.write = positions
    out = decoder(
        input_ids=ids,
        attention_mask=kv.mask(positions),
        position_ids=positions,
        use_cache=True,
        **fast.cache_kwargs(decoder, kv),
    )
    return out.last_hidden_state


class Steps:
    """Greedy picks of fixed-shape decoding steps ([rows, width] tokens in, the argmax at each
    position out). On a GPU the ``EAGER_STEPS + 1``-th step is captured as a CUDA graph, which
    the steps after it replay."""

    def __init__(self, model, kv: StaticKV, rows: int, width: int) -> None:
        import torch

        from workers import fast

        lm = fast.causal_lm(model)
        self.decoder, self.head, self.kv = lm.get_decoder(), lm.get_output_embeddings(), kv
        device = kv.keys[0].device
        self.ids = torch.zeros((rows, width), dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.ids)
        self.graphs = device.type == "cuda"
        self.graph = None
        self.picks = None
        self.steps = 0

    def _step(self):
        hidden = forward(self.decoder, self.kv, self.ids, self.positions)
        return self.head(hidden).argmax(-1)

    def __call__(self, ids, positions) -> list[list[int]]:
        """``ids`` and ``positions``: [rows, width] CPU tensors."""
        import torch

        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.steps += 1
        with torch.no_grad():
            if self.graph is not None:
                self.graph.replay()
                return self.picks.tolist()
            if self.graphs and self.steps > EAGER_STEPS:
                return self._run_and_capture()
            return self._step().tolist()

    def _run_and_capture(self) -> list[list[int]]:
        """This step eagerly on a side stream (the warm-up a capture needs), then the capture of
        the same step (recorded, not run again) for the steps that follow."""
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            picks = self._step().tolist()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # not torch.cuda.graph(): it first synchronizes and empties the allocator's cache, which
        # the capture does not need and the training steps after this eval would pay for again
        with torch.cuda.stream(stream):
            self.graph.capture_begin()
            try:
                self.picks = self._step()
            finally:
                self.graph.capture_end()
        return picks

    def close(self) -> None:
        """Free the graph's memory pool and the cache."""
        self.graph = self.picks = None
        self.kv.keys, self.kv.values = [], []


@dataclass
class Kept:
    """A decoding run's captured steps (with their cache), kept for the next eval of the same
    shape."""

    steps: Steps
    fingerprint: tuple


# per model (weakly: a dropped model drops its graphs): {(rows, length, width): Kept}
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model) -> tuple:
    """Addresses of the tensors a merged (or adapter-free) forward reads: a kept graph replays
    against these, so any that moved makes it stale. Adapter weights are left out: merged, the
    forward does not read them."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return tuple(t.data_ptr() for name, t in named if "lora_" not in name)


def kept(model, rows: int, length: int, width: int) -> Kept | None:
    """The kept decoding state of ``model`` for this shape, if it is still valid (stale state is
    freed)."""
    entries = _kept.get(model)
    entry = entries.get((rows, length, width)) if entries else None
    if entry is None:
        return None
    if entry.fingerprint != fingerprint(model):
        entry.steps.close()
        del entries[(rows, length, width)]
        return None
    return entry


def keep(model, rows: int, length: int, width: int, steps: Steps) -> bool:
    """Keep ``steps`` (its graph and cache) for the next eval of ``model`` at this shape, unless
    its cache would hold more than ``KEEP_MEMORY_FRACTION`` of the GPU between evals."""
    import torch

    kv = steps.kv
    held = sum(t.numel() * t.element_size() for t in kv.keys + kv.values)
    device = kv.keys[0].device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if held > KEEP_MEMORY_FRACTION * total:
            return False
    _kept.setdefault(model, {})[(rows, length, width)] = Kept(steps, fingerprint(model))
    return True
