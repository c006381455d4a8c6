"""The memory estimator sizes packs before a cent is spent (issue 20): ``resources.pack_slots:
auto`` picks the largest K that fits the GPU for the search space's dearest slot, an explicit K
that does not fit is refused naming the field, the predicted and the GPU's GiB and the largest K
that fits, and ``lorasweep validate`` prints the K and its predicted peak."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import SpecError
from orchestrator.memory_check import MemoryFit
from orchestrator.pack_plan import AUTO_MAX_SLOTS, CPU_AUTO_SLOTS, HEADROOM, choose_pack
from orchestrator.pack_sweep import resolved
from orchestrator.spec import parse_spec
from workers.memory import ModelShape, estimate_pack, pick_pack_size

H200_GIB = 141.0  # orchestrator/prices.yaml


def _shape(name: str) -> ModelShape:
    from transformers import LlamaConfig

    from workers.synthetic import SHAPES

    return ModelShape.from_config(LlamaConfig(vocab_size=32000, **SHAPES[name]))


def _gpu_spec(pack_slots, max_trials: int = 32, **trial) -> object:
    return parse_spec(
        {
            "name": "p",
            "max_trials": max_trials,
            "budget_usd": 5,
            "search_space": {
                "rank": {"choices": [8, 64]},
                "target_modules": {"choices": ["attn", "all_linear"]},
            },
            "trial": {"batch_size": 8, "max_seq_len": 1024, **trial},
            "resources": {"accelerator": "H200", "gpus_per_trial": 1, "pack_slots": pack_slots},
        }
    )


def _fit(spec, shape: ModelShape) -> MemoryFit:
    return MemoryFit(shape, H200_GIB, "H200", spec.trial.batch_size, spec.trial.max_seq_len)


def test_auto_picks_the_largest_pack_of_the_spaces_dearest_slot_that_fits():
    shape = _shape("llama-1.5b")
    spec = _gpu_spec("auto")
    choice = choose_pack(spec, _fit(spec, shape))
    # sized by rank 64 on all linear layers (the dearest the space draws), not rank 8 / attn
    expected = pick_pack_size(
        shape, "lora", batch=8, seq=1024, memory_gib=H200_GIB, rank=64, targets="all-linear"
    )
    cheaper = pick_pack_size(
        shape, "lora", batch=8, seq=1024, memory_gib=H200_GIB, rank=8, targets=["q_proj"]
    )
    assert 2 <= expected < cheaper  # the shape discriminates: the dearest slot decides
    assert (choice.slots, choice.rank, choice.targets) == (expected, 64, "all_linear")
    predicted = estimate_pack(shape, "lora", [(64, "all-linear")] * expected, batch=8, seq=1024)
    assert choice.predicted_gib == pytest.approx(predicted.total_gib)
    assert choice.predicted_gib <= HEADROOM * H200_GIB
    # the sweep runs with the number, not the word
    plan = type("Plan", (), {"pack": choice})()
    assert resolved(spec, plan).resources.pack_slots == expected
    assert spec.resources.pack_slots == "auto"


def test_auto_is_capped_at_eight_slots_and_at_max_trials():
    shape = _shape("llama-0.5b")
    spec = _gpu_spec("auto", batch_size=1, max_seq_len=256, max_new_tokens=64)
    assert choose_pack(spec, _fit(spec, shape)).slots == AUTO_MAX_SLOTS
    few = _gpu_spec("auto", max_trials=3, batch_size=1, max_seq_len=256, max_new_tokens=64)
    assert choose_pack(few, _fit(few, shape)).slots == 3


def test_an_explicit_pack_that_does_not_fit_is_refused_with_the_figures_and_the_fix():
    shape = _shape("llama-1.5b")
    spec = _gpu_spec(16)
    fits = pick_pack_size(
        shape,
        "lora",
        batch=8,
        seq=1024,
        memory_gib=H200_GIB,
        rank=64,
        targets="all-linear",
        max_slots=16,
    )
    need = estimate_pack(shape, "lora", [(64, "all-linear")] * 16, batch=8, seq=1024).total_gib
    with pytest.raises(SpecError) as err:
        choose_pack(spec, _fit(spec, shape))
    msg = str(err.value)
    assert err.value.field == "resources.pack_slots"
    assert f"predicted to peak at {need:.1f} GiB" in msg
    assert "the H200 has 141 GiB" in msg
    assert f"the largest pack that fits is {fits} slots: set pack_slots: {fits}" in msg
    # the K it names does fit
    assert choose_pack(_gpu_spec(fits), _fit(spec, shape)).slots == fits


def test_cpu_auto_is_a_fixed_pack_of_two_and_gpu_auto_without_an_estimate_is_refused():
    cpu = parse_spec({"name": "p", "budget_usd": 1, "resources": {"pack_slots": "auto"}})
    choice = choose_pack(cpu, None)
    assert choice.slots == CPU_AUTO_SLOTS == 2 and choice.predicted_gib is None
    with pytest.raises(SpecError) as err:
        choose_pack(_gpu_spec("auto"), None)
    assert err.value.field == "resources.pack_slots" and "give an integer" in str(err.value)
    assert choose_pack(_gpu_spec(1), None) is None  # pack_slots: 1 asks for no pack


def test_pack_slots_takes_an_integer_or_auto_only():
    for bad, words in [("many", "integer 1..16 or auto"), (17, "less than or equal to 16")]:
        with pytest.raises(SpecError) as err:
            parse_spec({"name": "p", "budget_usd": 1, "resources": {"pack_slots": bad}})
        assert err.value.field == "resources.pack_slots" and words in str(err.value)
    # auto asks for a pack: held to the packed sweep's rules
    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "name": "p",
                "budget_usd": 1,
                "resources": {"pack_slots": "auto", "max_concurrent_trials": 2},
            }
        )
    assert err.value.field == "resources.max_concurrent_trials"


# --- lorasweep validate, end to end on the tiny model ------------------------------------------
def _validate(
    tmp_path, tiny_model, small_data, pack_slots, memory_gib: float, command: str = "validate"
) -> tuple[int, str]:
    catalog = tmp_path / "prices.yaml"
    catalog.write_text(
        yaml.safe_dump(
            {
                "version": "test",
                "accelerators": {
                    "cpu": {"price_usd_per_hour": 0.05},
                    "SMALLGPU": {"price_usd_per_hour": 1.0, "memory_gib": memory_gib},
                },
            }
        )
    )
    spec = {
        "name": "pack",
        "budget_usd": 5,
        "model": {"name_or_path": str(tiny_model)},
        "data": {"source": "files", **{k: str(v) for k, v in small_data.items()}},
        "search_space": {"preset": "default", "method": "lora", "rank": {"choices": [2, 4]}},
        "trial": {
            "max_steps": 12,
            "eval_every": 4,
            "batch_size": 4,
            "max_seq_len": 160,
            "eval_examples": 4,
            "max_new_tokens": 8,
        },
        "resources": {"accelerator": "SMALLGPU", "gpus_per_trial": 1, "pack_slots": pack_slots},
        "prices": {"catalog": str(catalog)},
        "storage": {"data_dir": str(tmp_path / "data")},
    }
    path = tmp_path / f"spec-{pack_slots}.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = [command, str(path)] + (["--new"] if command == "run" else [])
    out = CliRunner().invoke(app, args, terminal_width=200)
    return out.exit_code, " ".join(out.output.split())


def test_validate_prints_the_chosen_pack_and_refuses_one_that_does_not_fit(
    tmp_path, tiny_model, small_data
):
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model))

    def gib(k: int) -> float:  # the default preset's widest set is all_linear; rank 4
        return estimate_pack(shape, "lora", [(4, "all-linear")] * k, batch=4, seq=160).total_gib

    memory_gib = (gib(3) + gib(4)) / 2 / HEADROOM  # 3 slots fit, 4 do not
    code, out = _validate(tmp_path, tiny_model, small_data, "auto", memory_gib)
    assert code == 0, out
    found = re.search(r"pack: (\d+) slots \(auto[^)]*\).*?predicted peak ([0-9.]+) GiB", out)
    assert found, out
    assert int(found.group(1)) == 3
    assert float(found.group(2)) == pytest.approx(gib(3), abs=0.05)
    assert "lora r4 all_linear, batch 4 x 160 tokens" in out

    code, out = _validate(tmp_path, tiny_model, small_data, 4, memory_gib)
    assert code != 0
    assert "resources.pack_slots: 4 slots of lora r4 all_linear" in out, out
    assert f"predicted to peak at {gib(4):.1f} GiB" in out
    assert f"the SMALLGPU has {memory_gib:g} GiB" in out
    assert "the largest pack that fits is 3 slots: set pack_slots: 3" in out

    # run refuses it the same way, before a sweep, a ledger or an MLflow store exists
    code, out = _validate(tmp_path, tiny_model, small_data, 4, memory_gib, command="run")
    assert code != 0 and "resources.pack_slots: 4 slots of lora r4 all_linear" in out, out
    assert not list(tmp_path.glob("data/**/*.db")), list(tmp_path.glob("data/**/*"))


# --- each trial's MLflow run says whether it ran packed -----------------------------------------
def test_a_packed_trials_run_logs_its_packs_k_and_the_packed_tag_an_unpacked_one_does_not(
    tmp_path,
):
    from mlflow.tracking import MlflowClient

    from orchestrator.callbacks import trial_params
    from orchestrator.pack_sweep import PackedFit
    from orchestrator.tracking import PACKED_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "packed", artifact_root=tmp_path / "artifacts")
    tracker.start_sweep("s1", {}, {})
    proposed = {
        "method": "lora",
        "rank": 8,
        "alpha": 16,
        "target_modules": "attn",
        "learning_rate": 1e-3,
        "dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "loraplus_lr_ratio": 0,
    }
    updates, skip = PackedFit(3)(proposed)  # the packed phase's admission marks the config
    assert skip is None
    packed = tracker.start_trial("s1", "trial-001", "t1", trial_params({**proposed, **updates}))
    alone = tracker.start_trial("s1", "trial-002", "t2", trial_params(proposed))
    client = MlflowClient(uri)
    run = client.get_run(packed).data
    assert run.params["pack_slots"] == "3" and run.tags[PACKED_TAG] == "true"
    run = client.get_run(alone).data
    assert run.params["pack_slots"] == "1" and PACKED_TAG not in run.tags
