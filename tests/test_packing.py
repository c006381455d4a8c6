"""Packed LoRA trials (``workers/packed.py``) train exactly as each trial alone (CPU, float32).

The reference is today's code path: ``workers.train.run_trial`` of the same config (PEFT adapter,
the fast step, its own optimizer), whose per-step losses and saved adapter each slot of a pack
must reproduce. The tiny random Llama stands in for a real base; the GPU check (bf16 tolerance)
is ``test_packed_step_on_gpu`` in this file, run on the device machine by ``bench/packing.py``'s
call (``pytest -m gpu``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers import train
from workers.model import load_tokenizer
from workers.packed import HoldBilling, Pack, PackError, PackServer

STEPS = 6
_alone_cache: dict = {}


def _cfg(trial_config, **kw):
    base = dict(max_steps=STEPS, eval_every=STEPS, dropout=0.0, reuse_base_model=False)
    return trial_config(**{**base, **kw})


def _alone(cfg) -> tuple[list[float], dict]:
    """(loss of every step, saved adapter weights) of ``cfg`` trained by ``run_trial``."""
    key = repr(cfg)
    if key not in _alone_cache:
        saved = {}

        def report(metrics, adapter_dir: Path):
            saved["losses"] = [loss for _, loss in metrics["train_loss_steps"]]
            saved["adapter"] = load_file(str(adapter_dir / "adapter_model.safetensors"))

        train.run_trial(cfg, report)
        _alone_cache[key] = (saved["losses"], saved["adapter"])
    return _alone_cache[key]


def _pack(cfg) -> Pack:
    torch.set_num_threads(cfg.num_threads)
    return Pack.load(cfg.model, dtype="float32", device="cpu")


def _data(cfg):
    """The rows ``run_trial`` draws for ``cfg``, step after step."""
    tokenizer = load_tokenizer(cfg.model)
    return train._batches(train._encoded_train_rows(tokenizer, cfg), cfg.batch_size, cfg.seed)


def _assert_as_alone(pack: Pack, key: str, cfg) -> None:
    losses, adapter = _alone(cfg)
    got = [loss for _, loss in pack.slots[key].losses]
    assert len(got) == len(losses) == cfg.max_steps
    # run_trial reports losses rounded to 5 decimals
    assert got == pytest.approx(losses, abs=1e-5), (key, got, losses)
    mine = {k: v.detach() for k, v in pack.adapter_state(key).items()}
    assert set(mine) == set(adapter)
    for name, weight in adapter.items():
        torch.testing.assert_close(mine[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert any(w.abs().sum() > 0 for n, w in adapter.items() if "lora_B" in n)  # it trained


def _run(pack: Pack, plan: dict) -> list[dict]:
    """Step the pack while any slot in ``plan`` (key -> (cfg, data)) has steps left."""
    results = []
    while True:
        rows = {
            k: next(data) for k, (cfg, data) in plan.items() if pack.slots[k].step < cfg.max_steps
        }
        if not rows:
            return results
        results.append(pack.step(rows))


def test_slots_of_different_configs_train_as_if_alone(trial_config):
    cfgs = [
        _cfg(trial_config, rank=4, alpha=8, target_modules="all_linear", learning_rate=5e-3),
        _cfg(
            trial_config,
            rank=8,
            alpha=16,
            target_modules="attn",
            learning_rate=1e-3,
            use_rslora=True,
            seed=1,
        ),
        _cfg(
            trial_config,
            rank=2,
            alpha=4,
            target_modules="mlp",
            learning_rate=2e-2,
            seed=2,
            loraplus_lr_ratio=4.0,
        ),
    ]
    pack = _pack(cfgs[0])
    keys = [pack.add(cfg) for cfg in cfgs]
    results = _run(pack, {k: (cfg, _data(cfg)) for k, cfg in zip(keys, cfgs, strict=True)})
    assert len(results) == STEPS
    for key, cfg in zip(keys, cfgs, strict=True):
        _assert_as_alone(pack, key, cfg)
    # each step returns every slot's tokens; shares (billing) add up to the whole step
    first = results[0]
    rows = [next(_data(cfg)) for cfg in cfgs]
    assert [first[k].tokens for k in keys] == [sum(len(i) for i, _ in r) for r in rows]
    assert sum(pack.token_shares(first).values()) == pytest.approx(1.0)


def test_a_slot_removed_and_refilled_midway(trial_config):
    a = _cfg(trial_config, rank=4, target_modules="all_linear")
    b = _cfg(trial_config, rank=8, target_modules="qv", seed=5)
    c = _cfg(trial_config, rank=6, alpha=12, target_modules="attn_mlp", learning_rate=2e-3, seed=7)
    pack = _pack(a)
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in pack.model.named_parameters()}
    ka, kb = pack.add(a), pack.add(b)
    data = {ka: (a, _data(a)), kb: (b, _data(b))}
    for _ in range(3):
        pack.step({k: next(d) for k, (_, d) in data.items()})
    pack.remove(kb)  # pruned after 3 steps
    assert all(kb not in layer.adapters for layer in pack.layers.values())
    kc = pack.add(c)
    assert kc == kb  # the refill takes the freed slot's place
    del data[kb]
    data[kc] = (c, _data(c))
    _run(pack, data)
    _assert_as_alone(pack, ka, a)
    _assert_as_alone(pack, kc, c)
    assert pack.slots[kc].step == STEPS and pack.slots[ka].step == STEPS
    # the base was never reloaded nor changed: same storage, same values
    for name, p in pack.model.named_parameters():
        if name in base:
            assert p.data_ptr() == base[name][0], name
            assert torch.equal(p.detach(), base[name][1]), name


def test_a_slot_of_padding_rows_changes_nothing(trial_config):
    a = _cfg(trial_config, rank=4)
    pad = _cfg(trial_config, rank=4, seed=3)
    pack = _pack(a)
    ka, kp = pack.add(a), pack.add(pad)
    start = {k: v.detach().clone() for k, v in pack.adapter_state(kp).items()}
    data_a = _data(a)
    pad_rows = [([0] * 40, [-100] * 40), ([0] * 17, [-100] * 17)]  # pad tokens, nothing labelled
    for _ in range(STEPS):
        out = pack.step({ka: next(data_a), kp: pad_rows})
        assert out[kp].loss == 0.0 and out[kp].tokens == 57
    _assert_as_alone(pack, ka, a)
    for name, weight in pack.adapter_state(kp).items():
        assert torch.equal(weight.detach(), start[name]), name


def test_a_pack_of_one_draws_the_dropout_of_the_trial_alone(trial_config):
    cfg = _cfg(trial_config, dropout=0.1, rank=4)
    pack = _pack(cfg)
    key = pack.add(cfg)
    _run(pack, {key: (cfg, _data(cfg))})
    _assert_as_alone(pack, key, cfg)
    plain = _alone(dataclasses.replace(cfg, dropout=0.0))[0]
    assert [loss for _, loss in pack.slots[key].losses][1:] != pytest.approx(plain[1:], abs=1e-4)


def test_a_pack_with_gradient_checkpointing_trains_as_the_trial_with_it(trial_config):
    cfg = _cfg(trial_config, rank=4, max_steps=3, gradient_checkpointing=True)
    pack = Pack.load(cfg.model, dtype="float32", device="cpu", gradient_checkpointing=True)
    key = pack.add(cfg)
    _run(pack, {key: (cfg, _data(cfg))})
    _assert_as_alone(pack, key, cfg)


def test_a_saved_slot_loads_in_peft_as_its_trial(trial_config, tmp_path):
    from peft import PeftModel

    from workers.model import load_base_model

    cfg = _cfg(trial_config, rank=4, target_modules="attn", max_steps=3)
    other = _cfg(trial_config, rank=2, target_modules="all_linear", seed=9, max_steps=3)
    pack = _pack(cfg)
    key, _ = pack.add(cfg), pack.add(other)
    _run(pack, {k: (c, _data(c)) for k, c in zip(pack.slots, (cfg, other), strict=True)})
    pack.save(key, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(load_base_model(cfg.model, "float32"), tmp_path / "adapter")
    ids = torch.tensor([next(_data(cfg))[0][0]])
    with torch.no_grad(), pack.only(key) as model:
        model.eval()
        expected = model(input_ids=ids).logits
    got = peft.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert peft.peft_config["default"].r == 4


def test_trials_in_threads_share_a_pack_and_train_as_if_alone(trial_config, small_data):
    """Three trials, each its own thread (as a threaded actor's calls): they join a PackServer,
    step through it, evaluate and leave; one joins late, after another left. Each trains as it
    would alone, its eval matches run_trial's, and the held seconds are all billed."""
    import threading

    from workers import evaluate
    from workers.data import read_examples

    cfgs = [
        _cfg(trial_config, rank=4, target_modules="all_linear", max_steps=4),
        _cfg(trial_config, rank=2, target_modules="attn", seed=1, max_steps=2),
        _cfg(trial_config, rank=8, target_modules="mlp", seed=2, learning_rate=1e-3, max_steps=4),
    ]
    server = PackServer(_pack(cfgs[0]), wait_s=0.5)
    tokenizer = load_tokenizer(cfgs[0].model)
    val = read_examples(small_data["validation"], "chat", "data.validation")
    done: dict = {}

    def trial(i: int, after: threading.Event | None, finished: threading.Event):
        if after is not None:
            after.wait()
        cfg = cfgs[i]
        key = server.join(cfg)
        data = _data(cfg)
        losses = [server.step(key, next(data)).loss for _ in range(cfg.max_steps)]
        with server.closing(key) as model:
            model.eval()
            result = evaluate.evaluate(model, tokenizer, val, cfg.max_seq_len, 8, 4)
        done[i] = (losses, result["eval_loss"], server.leave(key), key)
        finished.set()

    ends = [threading.Event() for _ in cfgs]
    threads = [
        threading.Thread(target=trial, args=(0, None, ends[0])),
        threading.Thread(target=trial, args=(1, None, ends[1])),
        threading.Thread(target=trial, args=(2, ends[1], ends[2])),  # refills trial 1's slot
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(done) == [0, 1, 2]
    server.billing.settle({})  # the idle tail since the last slot left: pending
    assert not server.billing.billed_s  # every trial left, with its bill
    assert all(done[i][2] > 0 for i in range(3))
    billed = sum(done[i][2] for i in range(3)) + server.billing.pending_s
    assert billed == pytest.approx(server.billing.held_s(), abs=0.01)
    assert done[2][3] in ("slot0", "slot1")  # the late trial took a freed slot's place
    assert max(server.step_sizes) == 2  # steps did pack two trials
    for i, cfg in enumerate(cfgs):
        alone_losses, _ = _alone(cfg)
        assert done[i][0] == pytest.approx(alone_losses, abs=1e-5), i
        report: dict = {}
        train.run_trial(cfg, lambda m, _d, report=report: report.update(m))
        assert done[i][1] == pytest.approx(report["eval_loss"], rel=1e-4), i


def test_a_failed_packed_step_reaches_every_trial_in_it(trial_config):
    cfg = _cfg(trial_config)
    server = PackServer(_pack(cfg), wait_s=0.01)
    key = server.join(cfg)
    with pytest.raises(ValueError):
        server.step(key, [])
    vocab = server.pack.model.config.vocab_size
    with pytest.raises(IndexError):  # a token id past the vocabulary: the embedding refuses it
        server.step(key, [([vocab + 5, 1, 2], [vocab + 5, 1, 2])])
    assert server.step(key, next(_data(cfg))).tokens > 0  # the pack goes on


def test_every_held_second_is_billed_to_some_slot_by_token_share():
    now = [100.0]
    billing = HoldBilling(start_monotonic=90.0, clock=lambda: now[0])  # 10 s of loading so far
    assert billing.settle({}) == {}  # an empty pack: the seconds wait
    now[0] = 104.0
    first = billing.settle({"a": 3000, "b": 1000})  # a step of 4 s, loading included: 14 s
    assert first == pytest.approx({"a": 10.5, "b": 3.5})
    now[0] = 106.0
    assert billing.settle({"b": 1.0}) == pytest.approx({"b": 2.0})  # b's eval and save
    now[0] = 107.0
    billing.settle({"a": 0, "c": 500})  # a idles this step: c (refilled) pays the step
    assert billing.billed_s == pytest.approx({"a": 10.5, "b": 5.5, "c": 1.0})
    assert sum(billing.billed_s.values()) == pytest.approx(billing.held_s()) == 17.0
    assert billing.close("b") == pytest.approx(5.5)  # b's trial ended; a new b starts at 0
    now[0] = 108.0
    billing.settle({"a": 1, "b": 1})
    assert billing.billed_s == pytest.approx({"a": 11.0, "b": 0.5, "c": 1.0})
    assert sum(billing.billed_s.values()) + billing.closed_s == pytest.approx(18.0)


def test_a_pack_lays_rows_out_as_the_trial_step_does():
    from workers import packing
    from workers.packed import _pack_rows

    rows = [([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9]), ([1], [1]), ([4] * 9, [-100] * 9)]
    expected, got = packing.pack(rows, max_length=16), _pack_rows(rows, 16)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert (got[key].tolist() if torch.is_tensor(value) else got[key]) == (
            value.tolist() if torch.is_tensor(value) else value
        ), key


def test_trials_that_cannot_be_packed_are_refused(trial_config):
    cfg = _cfg(trial_config)
    pack = _pack(cfg)
    for bad in (dict(method="full"), dict(use_dora=True), dict(micro_batch=2)):
        with pytest.raises(PackError):
            pack.add(dataclasses.replace(cfg, **bad))
    assert not pack.slots


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_step_on_gpu(trial_config):
    """bf16 on CUDA, packed attention (varlen flash): each slot's losses stay within bf16
    tolerance of the trial alone (``run_trial`` on CUDA)."""
    cfgs = [
        _cfg(trial_config, rank=4, device="cuda"),
        _cfg(
            trial_config, rank=8, target_modules="attn", seed=1, device="cuda", learning_rate=1e-3
        ),
    ]
    pack = Pack.load(cfgs[0].model, device="cuda")
    keys = [pack.add(c) for c in cfgs]
    _run(pack, {k: (c, _data(c)) for k, c in zip(keys, cfgs, strict=True)})
    for key, cfg in zip(keys, cfgs, strict=True):
        losses, _ = _alone(cfg)
        got = [loss for _, loss in pack.slots[key].losses]
        assert got == pytest.approx(losses, rel=2e-2, abs=2e-2)


# memory estimate of packs (workers/memory.py) --------------------------------------------------

SHAPE_05B = dict(vocab=32000, hidden=1024, layers=24, intermediate=4096, heads=16, kv_heads=8)


def test_a_pack_holds_the_base_once_and_each_slot_its_own_state_and_activations():
    from workers.memory import ModelShape, estimate, estimate_pack

    shape = ModelShape(**SHAPE_05B)
    one = estimate(shape, "lora", batch=8, seq=1024, rank=16, targets="all-linear")
    assert estimate_pack(shape, "lora", [(16, "all-linear")], batch=8, seq=1024) == one
    slots = [(16, "all-linear"), (64, "all-linear"), (8, ["q_proj", "v_proj"]), (16, ["up_proj"])]
    pack = estimate_pack(shape, "lora", slots, batch=8, seq=1024)
    alone = [estimate(shape, "lora", batch=8, seq=1024, rank=r, targets=t) for r, t in slots]
    assert pack.weights_gib == one.weights_gib  # one copy of the base
    assert pack.trainable_state_gib == pytest.approx(sum(e.trainable_state_gib for e in alone))
    assert pack.activations_gib == pytest.approx(sum(e.activations_gib for e in alone))
    separate = sum(e.total_gib for e in alone)
    saved = 3 * (one.weights_gib + one.workspace_gib + one.logits_gib)
    assert pack.total_gib == pytest.approx(separate - saved)
    with pytest.raises(ValueError):
        estimate_pack(shape, "full", slots, batch=8, seq=1024)


def test_pick_pack_size_takes_the_largest_k_that_fits():
    from workers.memory import ModelShape, estimate_pack, pick_pack_size

    shape = ModelShape(**SHAPE_05B)
    kw = dict(batch=8, seq=1024, rank=16, targets="all-linear")

    def total(k):
        return estimate_pack(shape, "lora", [(16, "all-linear")] * k, batch=8, seq=1024).total_gib

    memory = total(3) / 0.9 + 0.01  # room for three slots, not four
    assert pick_pack_size(shape, "lora", memory_gib=memory, **kw) == 3
    assert pick_pack_size(shape, "lora", memory_gib=total(4) / 0.9, **kw) == 4
    assert pick_pack_size(shape, "lora", memory_gib=total(1) / 0.9 - 0.01, **kw) == 0
    assert pick_pack_size(shape, "lora", memory_gib=10_000, max_slots=8, **kw) == 8
    # checkpointing shrinks the activations: more slots in the same memory
    ckpt = pick_pack_size(shape, "lora", memory_gib=memory, gradient_checkpointing=True, **kw)
    assert ckpt > 3


def test_a_slot_that_leaves_during_its_step_does_not_break_its_neighbours(trial_config):
    """A trial stopped from outside (ASHA; the driver makes its slot leave) while its step waits
    for the others: its step raises, its rows are dropped, the neighbour's step runs, and a new
    trial in the freed key is not mistaken for it."""
    import threading

    a, b = _cfg(trial_config), _cfg(trial_config, seed=1, rank=2)
    server = PackServer(_pack(a), wait_s=30.0)  # a step waits for every slot (or 30 s)
    key_a, key_b = server.join(a), server.join(b)
    got: dict = {}

    def step_a():
        try:
            server.step(key_a, next(_data(a)))
        except KeyError as exc:
            got["a"] = exc

    t = threading.Thread(target=step_a)
    t.start()
    deadline = time.monotonic() + 10
    while key_a not in server._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.leave(key_a) > 0  # billed what it held
    t.join(timeout=10)
    assert isinstance(got.get("a"), KeyError)
    assert server.step(key_b, next(_data(b))).tokens > 0  # b alone now: runs at once
    key_c = server.join(_cfg(trial_config, seed=2))
    assert key_c == key_a and server.step(key_c, next(_data(a))).tokens > 0
