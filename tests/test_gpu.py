"""GPU tests (CUDA only; deselected by default). Run on a GPU machine:

    python -m pytest -m gpu tests/test_gpu.py

They run the worker's own loop for lora, qlora and full on a Llama-shape model and check the
memory estimator against ``torch.cuda.max_memory_allocated`` (the full table comes from
``bench/memory_estimate.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
memory_bench = pytest.importorskip("memory_estimate")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    return memory_bench._prepare(tmp_path_factory.mktemp("gpu"), "llama-0.5b")


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_worker_loop_runs_and_memory_estimate_is_within_20_percent(model_and_data, method):
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("qlora needs bitsandbytes")
    model_dir, data = model_and_data
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = memory_bench.measure_one(str(model_dir), str(data), method, 4, 512, False, 16, "all_linear")
    assert r["measured_gib"] > r["static_gib"] > 0
    assert abs(r["predicted_gib"] / r["measured_gib"] - 1) <= 0.20


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_step_on_cuda_matches_the_padded_step(tiny_model, compiled):
    """Packed rows through torch's varlen flash attention (bf16) against padded rows through
    SDPA: the same loss and adapter gradients, to bf16 rounding."""
    from transformers import AutoModelForCausalLM

    from workers import fast, packing
    from workers.data import pad_batch
    from workers.lora import attach_lora

    def build():
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).cuda()
        torch.manual_seed(1)
        return attach_lora(model, rank=4, alpha=8, target_modules="all_linear", dropout=0.0)

    padded, packed = build(), build()
    assert packing.enable(fast.causal_lm(packed))
    if compiled:
        fast.compile_layers(packed)
    torch.manual_seed(0)
    rows = []
    for length, prompt in [(40, 10), (17, 5), (90, 30)]:
        ids = torch.randint(0, padded.config.vocab_size, (length,)).tolist()
        rows.append((ids, [-100] * prompt + ids[prompt:]))
    a = fast.loss(padded, {k: v.cuda() for k, v in pad_batch(rows, 0).items()})
    batch = packing.to_device(packing.pack(rows), "cuda")
    b = fast.loss(packed, batch)
    assert float(b) == pytest.approx(float(a), rel=2e-2)
    a.backward()
    b.backward()
    # lora_B starts at zero, so only the B matrices have gradients after the first backward
    ga = {n: p.grad.float() for n, p in padded.named_parameters() if "lora_B" in n}
    compared = 0
    for n, p in packed.named_parameters():
        if n in ga:
            cos = torch.nn.functional.cosine_similarity(
                p.grad.float().flatten(), ga[n].flatten(), 0
            )
            assert cos > 0.99, n
            compared += 1
    assert compared == len(ga) > 0


def test_compiled_trials_replay_cuda_graphs_like_the_plain_step(trial_config):
    """``trial.compile`` on CUDA (compiled layers replayed as CUDA graphs, bucketed packed rows,
    uncompiled evaluation): the losses of the plain step, and a second trial in the same process
    reuses the compiled base."""
    from workers import model_cache
    from workers.train import run_trial

    def losses(**kw):
        reports = []
        cfg = trial_config(device="cuda", max_steps=8, eval_every=4, **kw)
        run_trial(cfg, lambda m, d: reports.append(m))
        assert [r["step"] for r in reports] == [4, 8]
        assert all(0.0 <= r["score"] <= 1.0 for r in reports)
        return [v for r in reports for _, v in r["train_loss_steps"]], reports

    model_cache.clear()
    plain, _ = losses(compile=False)
    model_cache.clear()
    graphed, _ = losses(compile=True)
    again, reports = losses(compile=True)
    assert reports[-1]["base_model_reused"] == 1
    assert graphed == pytest.approx(plain, rel=3e-2)
    assert again == pytest.approx(graphed, rel=3e-2)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_kept_adapters_on_cuda_match_a_fresh_attach(trial_config, monkeypatch, method):
    """On CUDA (bf16 base; 4-bit NF4 for QLoRA): a worker that trained other target sets
    re-initialises its kept adapter exactly as a fresh attach draws it, and trains the same
    (to bf16 rounding: CUDA kernels need not add in the same order twice)."""
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("qlora needs bitsandbytes")
    from workers import lora, model_cache, train

    starts = []

    def recording(cfg):
        model, groups = setup_model(cfg)
        starts.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )
        return model, groups

    setup_model = train.setup_model
    monkeypatch.setattr(train, "setup_model", recording)

    def short(**kw):
        return trial_config(
            **{"max_steps": 4, "eval_every": 2, "device": "cuda", "method": method, **kw}
        )

    def reports(cfg):
        out = []
        train.run_trial(cfg, lambda m, d: out.append(m))
        return out

    cfg = short(target_modules="attn", rank=4, alpha=8, seed=7)
    model_cache.clear()
    reports(short(target_modules="attn", rank=8))
    reports(short(target_modules="all_linear", rank=16))
    attached, kept = lora.stats["attached"], lora.stats["reinitialised"]
    reused = reports(cfg)
    assert (lora.stats["attached"], lora.stats["reinitialised"]) == (attached, kept + 1)
    model_cache.clear()
    fresh = reports(cfg)
    model_cache.clear()
    assert lora.stats["attached"] == attached + 1
    reused_start, fresh_start = starts[2], starts[3]
    assert reused_start.keys() == fresh_start.keys() and reused_start
    assert all(torch.equal(reused_start[k], fresh_start[k]) for k in reused_start)
    assert [r["step"] for r in reused] == [r["step"] for r in fresh] == [2, 4]
    for a, b in zip(reused, fresh, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=2e-2)
        losses = [loss for _, loss in b["train_loss_steps"]]
        assert [loss for _, loss in a["train_loss_steps"]] == pytest.approx(losses, rel=2e-2)


def test_merged_eval_on_cuda_restores_the_bf16_base_exactly(trial_config, monkeypatch):
    """On CUDA trials evaluate with the adapter merged (``lora.merged_for_eval``): the bf16 base
    weights come back bit for bit, and the eval loss is the unmerged one up to bf16 rounding."""
    from workers import lora, model_cache, train

    cfg = trial_config(max_steps=4, eval_every=2, device="cuda", target_modules="all_linear")
    kept = {}

    def reports(merge: bool):
        monkeypatch.setattr(lora, "MERGE_FOR_EVAL_DEVICES", {"cuda"} if merge else set())
        out = []
        model_cache.clear()
        train.run_trial(cfg, lambda m, d: out.append(m))
        model = next(iter(model_cache._cache.values()))
        kept[merge] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return out

    plain, merged = reports(False), reports(True)
    assert kept[True].keys() == kept[False].keys()
    base = [n for n in kept[True] if "lora_" not in n]
    assert base and all(torch.equal(kept[True][n], kept[False][n]) for n in base)
    assert [r["eval_loss"] for r in merged] == pytest.approx(
        [r["eval_loss"] for r in plain], rel=2e-2
    )
    model_cache.clear()
