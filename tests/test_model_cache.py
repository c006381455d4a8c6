"""Base-model reuse between trials in one worker process, and the fast loss (CPU, no Ray)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from workers import fast, model_cache
from workers.train import TrialConfig, run_trial


@pytest.fixture
def short(trial_config):
    """Trials of 4 steps with an eval every 2."""
    return lambda **kw: trial_config(**{"max_steps": 4, **kw})


REPORT_KEYS = ("step", "eval_loss", "score", "train_loss_steps", "tokens")


def _run(cfg: TrialConfig) -> list[dict]:
    reports: list[dict] = []
    run_trial(cfg, lambda m, d: reports.append(m))
    return [{k: r[k] for k in REPORT_KEYS} for r in reports]


def test_reused_base_gives_the_results_of_a_fresh_load(short):
    first = short(rank=8, target_modules="attn", use_dora=True)
    second = short(learning_rate=1e-3, gradient_checkpointing=True)
    model_cache.clear()
    _run(first)  # leaves its base model in the cache
    loads, reuses = model_cache.stats["loads"], model_cache.stats["reuses"]
    reused = _run(second)
    assert model_cache.stats["reuses"] == reuses + 1 and model_cache.stats["loads"] == loads
    model_cache.clear()
    fresh = _run(second)
    assert model_cache.stats["loads"] == loads + 1
    assert reused == fresh  # same losses, scores and tokens, step by step


def _run_saving(cfg: TrialConfig) -> tuple[list[dict], dict]:
    """The trial's reports and its last saved adapter (config and weights)."""
    from safetensors.torch import load_file

    saved: dict = {}

    def keep(metrics, adapter_dir):
        saved["config"] = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        saved["weights"] = load_file(Path(adapter_dir) / "adapter_model.safetensors")

    reports: list[dict] = []
    run_trial(cfg, lambda m, d: (reports.append(m), keep(m, d)))
    return [{k: r[k] for k in REPORT_KEYS} for r in reports], saved


@pytest.mark.parametrize(
    "before, second",
    [
        ([dict(rank=8, alpha=16, dropout=0.0)], dict(rank=8, alpha=16)),  # same shapes
        (
            [dict(rank=8, alpha=16, dropout=0.0)],
            dict(rank=2, alpha=6, dropout=0.1, use_rslora=True, learning_rate=1e-3),  # reshaped
        ),
        (  # its adapter was parked while another target set trained
            [dict(rank=8), dict(target_modules="all_linear", rank=16)],
            dict(rank=4, alpha=8, loraplus_lr_ratio=8.0, seed=5),
        ),
    ],
    ids=["same-rank", "new-rank-alpha-dropout-rslora", "parked-loraplus-seed"],
)
def test_a_kept_adapter_gives_the_results_of_a_fresh_attach(short, before, second):
    """A worker's next trial on target modules it has seen re-initialises that adapter in place
    instead of injecting a new one: same losses, scores, saved config and saved weights as a
    fresh attach on a freshly loaded base."""
    from workers import lora

    cfg = short(target_modules="attn", **second)
    model_cache.clear()
    for kw in before:
        _run(short(**{"target_modules": "attn", **kw}))
    attached, kept = lora.stats["attached"], lora.stats["reinitialised"]
    reused_reports, reused_adapter = _run_saving(cfg)
    assert lora.stats["reinitialised"] == kept + 1 and lora.stats["attached"] == attached
    model_cache.clear()
    fresh_reports, fresh_adapter = _run_saving(cfg)
    assert lora.stats["attached"] == attached + 1
    assert reused_reports == fresh_reports
    assert reused_adapter["config"] == fresh_adapter["config"]
    assert reused_adapter["config"]["r"] == cfg.rank
    assert reused_adapter["config"]["lora_alpha"] == cfg.alpha
    weights = reused_adapter["weights"]
    assert weights.keys() == fresh_adapter["weights"].keys()
    assert all(torch.equal(weights[k], fresh_adapter["weights"][k]) for k in weights)
    assert all(w.shape[0] == cfg.rank for k, w in weights.items() if "lora_A" in k)


def test_a_new_target_set_is_added_once_and_dora_starts_from_the_base(short):
    from workers import lora

    model_cache.clear()
    _run(short(target_modules="attn"))
    attached, kept = lora.stats["attached"], lora.stats["reinitialised"]
    _run(short(target_modules="all_linear"))  # added beside the parked attn adapter
    _run(short(target_modules="attn"))  # back: re-initialised, not injected
    assert (lora.stats["attached"], lora.stats["reinitialised"]) == (attached + 1, kept + 1)
    _run(short(target_modules="all_linear", use_dora=True))  # unloads everything first
    assert lora.stats["attached"] == attached + 2
    model_cache.clear()


def test_saved_adapter_is_what_peft_saves_and_loads(tiny_model, tmp_path):
    """``save_adapter`` writes PEFT's own files for the active adapter of a model holding two
    (config as ``save_pretrained`` writes it for a "default" adapter, the same weight names),
    and PEFT loads them back."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from workers.lora import TARGET_MODULES, attach_lora, save_adapter

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model)

    kw = dict(rank=4, alpha=8, dropout=0.0)
    model = attach_lora(base(), target_modules="all_linear", **kw)
    model = attach_lora(model, target_modules="attn", seed=3, **kw)
    save_adapter(model, tmp_path / "ours")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES["attn"],
        task_type="CAUSAL_LM",
        bias="none",
    )
    get_peft_model(base(), config).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    ours["target_modules"], theirs["target_modules"] = (
        sorted(ours["target_modules"]),
        sorted(theirs["target_modules"]),
    )
    assert ours == theirs
    saved = load_file(tmp_path / "ours/adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "peft/adapter_model.safetensors").keys()
    loaded = PeftModel.from_pretrained(base(), tmp_path / "ours")
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved) > 0
    assert all(torch.equal(v, saved[k.replace(".default", "")]) for k, v in state.items())


def test_full_ft_never_reuses_and_clears_the_cache(short):
    model_cache.clear()
    _run(short())
    reuses = model_cache.stats["reuses"]
    _run(short(method="full", learning_rate=1e-4))
    assert model_cache.stats["reuses"] == reuses
    assert model_cache._cache == {}


def test_fast_loss_equals_the_models_own_loss(tiny_model):
    from transformers import AutoModelForCausalLM

    from workers.lora import attach_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = attach_lora(model, rank=4, alpha=8, target_modules="all_linear", dropout=0.0)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 15:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert fast.supported(model)
    expected = model(**batch).loss
    got = fast.loss(model, batch, chunk_tokens=7)  # several chunks, one ragged
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    got.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


class _Stopped(Exception):
    """What Tune does to a trial it stops: its report call never returns."""


def test_a_stopped_trials_base_is_reused_by_the_next_trial(short):
    def stop_at_first_report(metrics, adapter_dir):
        raise _Stopped

    model_cache.clear()
    with pytest.raises(_Stopped):
        run_trial(short(use_dora=True), stop_at_first_report)
    loads, reuses = model_cache.stats["loads"], model_cache.stats["reuses"]
    second = short(learning_rate=1e-3)
    reused = _run(second)
    assert model_cache.stats["reuses"] == reuses + 1 and model_cache.stats["loads"] == loads
    model_cache.clear()
    assert reused == _run(second)  # the stopped trial's adapter is gone from the base


def test_compiled_and_plain_trials_do_not_share_a_base(trial_config):
    """Compiled layers keep static shapes: a plain trial must not train on them."""
    from workers.methods import cache_key

    assert cache_key(trial_config(compile=True)) != cache_key(trial_config(compile=False))
    assert cache_key(trial_config(compile=False)) == cache_key(trial_config(compile=False, seed=3))


def test_trials_in_new_threads_do_not_grow_the_worker(trial_config):
    """Tune runs each trial's function in a new thread; glibc's per-thread malloc arenas kept
    what each trial freed, so a reused worker grew by ~1.2 GB a trial until Ray's memory monitor
    killed it. Three 2-step trials of the embedded model (135M), each in a new thread: the process
    must not grow by more than a fraction of that. (Without the fix: +1.4 GB here.)"""
    import threading

    from workers.model import resolve_model

    if not Path("/proc/self/statm").exists():
        pytest.skip("reads the resident set from /proc (Linux)")

    model_cache.clear()
    cfg = trial_config(model=resolve_model("embedded"), max_steps=2, eval_every=2)
    rss = []
    for seed in range(3):
        thread = threading.Thread(target=run_trial, args=(replace(cfg, seed=seed), _ignore))
        thread.start()
        thread.join()
        rss.append(
            int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        )
    model_cache.clear()
    assert rss[-1] - rss[0] < 300 * 2**20, [round(r / 2**30, 2) for r in rss]


def _ignore(metrics, adapter_dir) -> None:
    pass
