"""Evaluation with the adapter merged into the base weights (``workers.lora.merged_for_eval``).

On by default on CUDA only; here it is switched on for the CPU so that the tiny random model
can check it: the base weights come back bit for bit, evaluation gives the unmerged results
(float32: merging changes only rounding), and trials train exactly as without it.
"""

from __future__ import annotations

import pytest
import torch

from workers import evaluate, lora, model_cache
from workers.data import read_examples
from workers.model import load_tokenizer
from workers.train import run_trial


def _model(tiny_model, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    model = lora.attach_lora(
        model, **{"rank": 4, "alpha": 8, "target_modules": "all_linear", "dropout": 0.0, **kw}
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B is zero at the start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _base_weights(model) -> dict:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" not in n and "magnitude" not in n
    }


def _eval(model, tiny_model, small_data) -> dict:
    tokenizer = load_tokenizer(str(tiny_model))
    val = read_examples(small_data["validation"], "chat", "data.validation")[:4]
    return evaluate.evaluate(model, tokenizer, val, 160, 16, 4)


def _merged_layers(model) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(m.merged for m in model.modules() if isinstance(m, LoraLayer))


def test_merged_eval_gives_the_unmerged_results_and_restores_the_base_exactly(
    tiny_model, small_data, monkeypatch
):
    model = _model(tiny_model)
    before = _base_weights(model)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    plain = _eval(model, tiny_model, small_data)
    monkeypatch.setattr(lora, "MERGE_FOR_EVAL_DEVICES", {"cpu"})
    with lora.merged_for_eval(model):
        assert _merged_layers(model) == 2 * 7  # 2 layers x 7 linear modules
        changed = _base_weights(model)
        assert any(not torch.equal(changed[n], before[n]) for n in before)
        merged = _eval(model, tiny_model, small_data)
    assert _merged_layers(model) == 0
    after = _base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
    assert merged["generations"] == plain["generations"]
    assert merged["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


def test_not_merged_off_its_devices_short_of_memory_nor_for_dora(
    tiny_model, small_data, monkeypatch
):
    model = _model(tiny_model)
    with lora.merged_for_eval(model) as merged:  # default devices: CUDA and CPU
        assert merged and _merged_layers(model) == 2 * 7
    monkeypatch.setattr(lora, "MERGE_FOR_EVAL_DEVICES", {"cuda"})
    with lora.merged_for_eval(model) as merged:
        assert not merged and _merged_layers(model) == 0
    monkeypatch.setattr(lora, "MERGE_FOR_EVAL_DEVICES", {"cpu"})
    monkeypatch.setattr(lora, "_free_bytes", lambda device: 0)
    with lora.merged_for_eval(model) as merged:  # no room for the copy of the weights
        assert not merged and _merged_layers(model) == 0
    monkeypatch.undo()
    dora = _model(tiny_model, use_dora=True)
    before = _base_weights(dora)
    with lora.merged_for_eval(dora):
        assert _merged_layers(dora) == 0
        assert all(torch.equal(p, before[n]) for n, p in _base_weights(dora).items())


def test_trials_with_merged_eval_train_exactly_as_without(trial_config, monkeypatch):
    cfg = trial_config(max_steps=4)

    def reports():
        out: list[dict] = []
        model_cache.clear()
        run_trial(cfg, lambda m, d: out.append(m))
        return out

    monkeypatch.setattr(lora, "MERGE_FOR_EVAL_DEVICES", set())
    plain = reports()
    monkeypatch.setattr(lora, "MERGE_FOR_EVAL_DEVICES", {"cpu"})  # the default
    merged = reports()
    assert [r["train_loss_steps"] for r in merged] == [r["train_loss_steps"] for r in plain]
    assert [r["score"] for r in merged] == [r["score"] for r in plain]
    assert [r["eval_loss"] for r in merged] == pytest.approx([r["eval_loss"] for r in plain])
