"""Methods, the memory estimator's arithmetic, the full-FT gate and the method report (CPU)."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.leaderboard import Row
from orchestrator.memory_check import MemoryFit
from orchestrator.report import full_ft_gate, lora_vs_full, method_summary, pareto_front
from orchestrator.spec import parse_spec
from workers.memory import GIB, ModelShape, estimate, fit_config
from workers.synthetic import SHAPES

# hand-computable: d 8, 2 layers, ffn 16, 2 heads / 1 kv head (kv width 4), vocab 100, untied
SMALL = ModelShape(vocab=100, hidden=8, layers=2, intermediate=16, heads=2, kv_heads=1)
WS = 0.25 * GIB


def test_shape_counts_by_hand():
    # per layer: q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 128 = 576
    assert SMALL.n_linear == 2 * 576
    assert SMALL.n_params == 1152 + 2 * 100 * 8 + (2 * 2 * 8 + 8)  # linears, embed+head, norms
    # rank 2 on every projection: 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) per layer
    assert SMALL.n_lora(2, "all-linear") == 2 * 256
    assert SMALL.n_lora(2, ["q_proj", "v_proj"]) == 2 * 2 * (16 + 12)
    assert SMALL.lora_input_width("all-linear") == 6 * 8 + 16


def test_estimate_full_by_hand():
    e = estimate(SMALL, "full", batch=1, seq=10)
    assert e.weights_gib * GIB == pytest.approx(2792 * 2)
    assert e.trainable_state_gib * GIB == pytest.approx(2792 * 2 * 2)  # two bf16 moments
    # per token per layer: 22*8 + 4*4 + 8*16 = 320 bytes; 10 tokens, 2 layers
    assert e.activations_gib * GIB == pytest.approx(2 * 10 * 320)
    assert e.logits_gib * GIB == pytest.approx(10 * 100 * 10)
    assert e.total_gib * GIB == pytest.approx(5584 + 11168 + 6400 + 10000 + WS)


def test_estimate_lora_and_qlora_by_hand():
    lora = estimate(SMALL, "lora", batch=1, seq=10, rank=2, targets="all-linear")
    assert lora.trainable_state_gib * GIB == pytest.approx(512 * 16)  # fp32 param+grad+2 moments
    # 13.1*8 + 4*4 + 6*16 + 3.0 * 64 (targeted input widths) = 408.8 bytes
    assert lora.activations_gib * GIB == pytest.approx(2 * 10 * 408.8)
    qlora = estimate(SMALL, "qlora", batch=1, seq=10, rank=2, targets="all-linear")
    assert qlora.weights_gib * GIB == pytest.approx(1152 * (0.5 + 0.127 / 8) + 1640 * 2)
    ckpt = estimate(SMALL, "lora", batch=1, seq=10, rank=2, gradient_checkpointing=True)
    assert ckpt.activations_gib * GIB == pytest.approx(2 * 10 * 8 * 2 + 0.25 * 10 * 408.8)


def _shape(name: str) -> ModelShape:
    s = SHAPES[name]
    return ModelShape(
        vocab=32000,
        hidden=s["hidden_size"],
        layers=s["num_hidden_layers"],
        intermediate=s["intermediate_size"],
        heads=s["num_attention_heads"],
        kv_heads=s["num_key_value_heads"],
    )


def test_fit_config_adjusts_then_skips():
    shape = _shape("llama-1.5b")
    as_is = fit_config(shape, "lora", batch=8, seq=1024, memory_gib=80)
    assert as_is[:3] == (8, 1, False)
    ckpt = fit_config(shape, "lora", batch=8, seq=1024, memory_gib=24)  # A10G
    assert ckpt[:3] == (8, 1, True) and ckpt[3].total_gib <= 0.9 * 24
    micro = fit_config(shape, "lora", batch=8, seq=1024, memory_gib=6)
    assert micro[0] < 8 and micro[0] * micro[1] == 8 and micro[2]
    assert micro[3].total_gib <= 0.9 * 6
    assert fit_config(shape, "full", batch=8, seq=1024, memory_gib=4) is None  # weights alone


def test_memory_fit_adjusts_or_skips_with_a_reason():
    fit = MemoryFit(_shape("llama-1.5b"), 24.0, "A10G", batch=8, seq=1024)
    updates, reason = fit({"method": "lora", "rank": 16, "target_modules": "all_linear"})
    assert reason is None and updates["gradient_checkpointing"] is True
    updates, reason = MemoryFit(_shape("llama-1.5b"), 4.0, "T4-ish", 8, 1024)(
        {"method": "full", "rank": 16, "target_modules": "all_linear"}
    )
    assert updates == {} and "full" in reason and "4 GiB" in reason


@pytest.mark.parametrize(
    "kw, run, words",
    [
        ({"max_runs": 0}, False, "max_runs is 0"),
        ({"gate": "below_target", "target_score": 0.8, "best_lora_score": 0.9}, False, "reached"),
        ({"gate": "below_target", "target_score": 0.8, "best_lora_score": 0.5}, True, "below"),
        ({"gate": "always", "best_lora_score": 0.99}, True, "always"),
        ({"gate": "always", "predicted_usd": 5.0}, False, "only $1.0000 is left"),
    ],
)
def test_full_ft_gate(kw, run, words):
    args = {
        "max_runs": 2,
        "gate": "always",
        "target_score": None,
        "best_lora_score": 0.5,
        "predicted_usd": 0.5,
        "remaining_usd": 1.0,
        **kw,
    }
    ok, reason = full_ft_gate(**args)
    assert ok is run and words in reason


def _row(method, score, cost, name="t") -> Row:
    return Row(name, method, 8, 16, "all_linear", 1e-3, score, 0.1, cost, 10.0, "completed", "r")


def test_method_report_line_and_pareto():
    rows = [
        _row("lora", 0.80, 1.0),
        _row("lora", 0.90, 2.0),
        _row("qlora", 0.85, 1.5),
        _row("full", 1.00, 8.0),
        _row("full", 0.70, 9.0),
    ]
    summary = method_summary(rows)
    assert summary["lora"]["best_score"] == 0.90 and summary["lora"]["best_cost_usd"] == 2.0
    assert summary["full"]["trials"] == 2 and summary["full"]["total_cost_usd"] == 17.0
    line = lora_vs_full(summary)
    assert line.startswith("best LoRA reaches 90% of the best full-FT score at 25% of its cost")
    assert [r.score for r in pareto_front(rows)] == [0.80, 0.85, 0.90, 1.00]
    assert lora_vs_full(method_summary(rows[:3])) is None  # no full FT: no line


def test_method_dimension_in_the_spec():
    spec = parse_spec(
        {
            "name": "x",
            "budget_usd": 1,
            "resources": {"accelerator": "H100", "gpus_per_trial": 1},
            "search_space": {
                "method": {"choices": ["lora", "qlora"]},
                "use_dora": {"choices": [False, True]},
                "loraplus_lr_ratio": 16,
                "rank": 8,
            },
        }
    )
    assert spec.search_space.method.choices == ["lora", "qlora"]
    assert spec.search_space.loraplus_lr_ratio.value == 16  # scalar shorthand
    assert spec.search_space.rank.value == 8
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "x", "budget_usd": 1, "search_space": {"method": "qlora"}})
    assert err.value.field == "search_space.method" and "CUDA" in str(err.value)
    with pytest.raises(SpecError, match="unknown"):
        parse_spec({"name": "x", "budget_usd": 1, "search_space": {"method": "prefix"}})
    with pytest.raises(SpecError, match="target_score"):
        parse_spec({"name": "x", "budget_usd": 1, "full": {"max_runs": 2}})


def test_qlora_without_cuda_is_refused_by_the_worker(tiny_model, small_data):
    from workers.methods import MethodError
    from workers.train import TrialConfig, run_trial

    cfg = TrialConfig(
        model=str(tiny_model),
        train_path=str(small_data["train"]),
        validation_path=str(small_data["validation"]),
        method="qlora",
    )
    with pytest.raises(MethodError, match="CUDA"):
        run_trial(cfg, lambda m, d: None)


@pytest.mark.parametrize(
    "options",
    [
        {"method": "full", "learning_rate": 1e-4},
        {"use_dora": True},
        {"use_rslora": True, "rank": 16},
        {"loraplus_lr_ratio": 16.0},
        {"gradient_checkpointing": True, "micro_batch": 2},
    ],
)
def test_worker_runs_each_method_and_option(trial_config, options):
    from workers.train import run_trial

    base = dict(max_steps=2, max_seq_len=128, eval_examples=2, max_new_tokens=4)
    saved = []
    last = run_trial(
        trial_config(**{**base, **options}),
        lambda m, d: saved.append(sorted(p.name for p in d.iterdir())),
    )
    assert last["status"] == "completed" and last["step"] == 2 and last["train_loss"] > 0
    weights = (
        "model.safetensors" if options.get("method") == "full" else "adapter_model.safetensors"
    )
    assert weights in saved[-1]
