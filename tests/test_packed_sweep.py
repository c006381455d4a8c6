"""Trials run as slots of one shared pack (``orchestrator/pack_host.py``, ``pack_trial.py``): each
trains, evaluates and is billed as the same trial alone would be (CPU, float32, the tiny
random-init Llama), its budget checks hold inside its grant, and every second the pack held is
billed to some trial or returned to the sweep. Once in-process (threads: what a threaded actor's
calls are), once through a real Ray actor."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.pack_host import PackHost, remote_host
from orchestrator.pack_trial import PackClock, run_packed_trial
from workers import train
from workers.packed import PackError
from workers.train import FixedBudget

STEPS = 4


def _cfg(trial_config, **kw):
    base = dict(max_steps=STEPS, eval_every=2, dropout=0.0, reuse_base_model=False)
    return trial_config(**{**base, "price_usd_per_hour": 36.0, **kw})


def _reports(run) -> list[dict]:
    got = []

    def report(metrics, adapter_dir: Path):
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        assert (adapter_dir / "adapter_config.json").is_file()
        got.append({**metrics, "adapter": weights})

    run(report)
    return got


def _alone(cfg) -> list[dict]:
    return _reports(lambda report: train.run_trial(cfg, report))


def _losses(metrics: dict) -> list[float]:
    return [loss for _, loss in metrics["train_loss_steps"]]


def _assert_as_alone(packed: list[dict], alone: list[dict]) -> None:
    assert [r["step"] for r in packed] == [r["step"] for r in alone]
    for p, a in zip(packed, alone, strict=True):
        assert _losses(p) == pytest.approx(_losses(a), abs=1e-5)
        assert p["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
        assert p["score"] == a["score"]
        assert sorted(p["adapter"]) == sorted(a["adapter"])
        for k in a["adapter"]:
            assert (p["adapter"][k] - a["adapter"][k]).abs().max() < 1e-4, k


def test_two_trials_in_one_pack_train_evaluate_and_bill_as_alone(trial_config):
    cfgs = [
        _cfg(trial_config, rank=4, target_modules="all_linear"),
        _cfg(trial_config, rank=2, target_modules="attn", seed=1, learning_rate=1e-3),
    ]
    host = PackHost(cfgs[0].model, dtype="float32", wait_s=0.5, num_threads=1)
    got: dict[int, list] = {}

    def trial(i):
        got[i] = _reports(lambda report: run_packed_trial(cfgs[i], f"t{i}", host, report))

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(got) == [0, 1]
    assert max(host.stats()) == 2  # steps did pack both trials
    for i, cfg in enumerate(cfgs):
        _assert_as_alone(got[i], _alone(cfg))
        assert got[i][-1]["status"] == "completed" and got[i][-1]["packed"] == 1
    # money: the two trials' bills and what no trial paid add up to the pack's held time
    unbilled_s = host.shutdown()
    billed_s = sum(got[i][-1]["billed_s"] for i in range(2))
    assert billed_s > 0 and unbilled_s >= 0
    assert billed_s + unbilled_s == pytest.approx(host.held_s(), abs=0.05)
    assert host.shutdown() == 0.0  # once


def test_a_packed_trial_stops_inside_a_small_grant_and_its_neighbour_goes_on(trial_config):
    cfg = _cfg(trial_config, max_steps=400, eval_every=200, release_s=0.5)
    host = PackHost(
        cfg.model, dtype="float32", wait_s=0.05, num_threads=1, start_monotonic=time.monotonic()
    )
    clock = PackClock(cfg.price_usd_per_hour)
    ceiling_usd = 0.05  # 5 s at 36 $/h: some steps and the closing, not 400 steps
    got = _reports(
        lambda report: run_packed_trial(
            cfg, "small", host, report, FixedBudget(ceiling_usd), clock=clock
        )
    )
    assert got and got[-1]["status"] == "budget_stopped", got
    assert 0 < got[-1]["step"] < 400
    assert clock.cost_usd() <= ceiling_usd  # closed inside its grant, leaving included
    assert host.trials() == []  # it left the pack
    other = _cfg(trial_config, max_steps=2, eval_every=2)
    assert _reports(lambda r: run_packed_trial(other, "next", host, r))[-1]["step"] == 2


def test_trials_that_cannot_be_packed_are_refused_before_joining(trial_config):
    host = PackHost(_cfg(trial_config).model, dtype="float32", num_threads=1)
    with pytest.raises(PackError, match="full fine-tuning and DoRA run unpacked"):
        run_packed_trial(_cfg(trial_config, use_dora=True), "dora", host, lambda m, d: None)
    with pytest.raises(PackError, match="cannot resume"):
        run_packed_trial(_cfg(trial_config), "r", host, lambda m, d: None, resume_from=Path("."))
    assert host.trials() == []


@pytest.mark.slow
def test_trials_share_a_pack_actor_on_real_ray(trial_config, ray_local):
    """The host as a Ray actor, two trials as Ray tasks calling it: both pack, both train as
    alone, and the actor's held seconds are all billed or returned."""
    import ray

    cfgs = [
        _cfg(trial_config, rank=4),
        _cfg(trial_config, rank=8, target_modules="attn_mlp", seed=3),
    ]
    host = remote_host(0, 1, 2, model_ref=cfgs[0].model, dtype="float32", wait_s=1.0)

    @ray.remote(num_cpus=0)
    def trial(cfg, trial_id, host):
        from orchestrator.pack_trial import run_packed_trial

        metrics = []
        run_packed_trial(cfg, trial_id, host, lambda m, d: metrics.append(m))
        return metrics

    results = ray.get([trial.remote(c, f"r{i}", host) for i, c in enumerate(cfgs)], timeout=300)
    assert max(ray.get(host.stats.remote())) == 2
    for got, cfg in zip(results, cfgs, strict=True):
        alone = _alone(cfg)
        assert [_losses(m) for m in got] == [pytest.approx(_losses(a), abs=1e-5) for a in alone]
    unbilled_s = ray.get(host.shutdown.remote())
    held_s = ray.get(host.held_s.remote())
    billed_s = sum(got[-1]["billed_s"] for got in results)
    assert billed_s + unbilled_s == pytest.approx(held_s, abs=0.1)
    ray.kill(host)


@pytest.mark.slow
def test_a_packed_sweep_runs_its_trials_as_slots_of_one_pack(
    tmp_path, tiny_model, small_data, ray_local
):
    """``resources.pack_slots: auto`` (on CPU: 2) on real Ray, sqlite MLflow/Optuna/ledger:
    every trial is a Tune trial with its own MLflow child run, score and bill, which records
    that it was packed (param ``pack_slots`` 2, tag ``lorasweep.packed``); two at a time share
    the one pack;
    the bills (trials, the pack's unpaid seconds, the base eval) are the ledger's spend, which
    covers what the OS's clock of the paid processes (the pack's host, the base eval) saw held,
    under the cap."""
    import io

    import outside_clock
    from mlflow.tracking import MlflowClient
    from rich.console import Console
    from test_sweep_e2e import _spec

    from orchestrator import leaderboard
    from orchestrator.spec import parse_spec
    from orchestrator.sweep import run_sweep

    raw = _spec(tmp_path, tiny_model, small_data, budget_usd=5.0, max_trials=4).model_dump(
        mode="json"
    )
    raw["resources"].update(pack_slots="auto", max_concurrent_trials=1)
    spec = parse_spec(raw)
    # the paid processes of a packed sweep: the host holding the pack, the base-model eval
    with outside_clock.ProcessMeter(titles=outside_clock.PACKED_TITLES) as meter:
        result = run_sweep(spec, Console(file=io.StringIO(), width=200))
    assert result.end_reason.startswith("max_trials"), result.end_reason
    assert len(result.rows) == 4 and {r.status for r in result.rows} <= {"completed", "pruned"}
    client = MlflowClient(result.tracking_uri)
    parent = leaderboard.find_sweep(result.tracking_uri, result.sweep_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(runs) == 4
    for run in runs:
        assert 0 <= run.data.metrics["score"] <= 1
        assert run.data.metrics["cost_usd"] > 0
        assert run.data.params["pack_slots"] == "2"  # auto on CPU, resolved before the run
        assert run.data.tags["lorasweep.packed"] == "true"
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans  # overlapped
    assert any(s["title"].startswith("ray::PackHost") for s in meter.spans), meter.spans
    outside_usd = meter.cost_usd(36.0)
    assert result.spent_usd <= spec.budget_usd and outside_usd <= spec.budget_usd
    # every held second billed: the ledger's spend is at least what the OS saw held (polling
    # slack). Alone this test finds them equal within 1%; after other sweeps on a loaded
    # machine the ledger was seen up to 60% above the OS (conservative; cause not yet found)
    assert result.spent_usd >= 0.9 * outside_usd - 0.01, (result.spent_usd, meter.spans)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resources": {"max_concurrent_trials": 2}}, "resources.max_concurrent_trials"),
        ({"search_space": {"method": {"choices": ["lora", "full"]}}}, "search_space.method"),
        ({"search_space": {"use_dora": {"choices": [False, True]}}}, "search_space.use_dora"),
    ],
)
def test_a_pack_that_cannot_run_is_refused_naming_the_field(change, field):
    from orchestrator.errors import SpecError
    from orchestrator.spec import parse_spec

    raw = {"name": "p", "budget_usd": 1, "resources": {"pack_slots": 2}}
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert str(err.value).startswith(field), err.value
    assert "pack_slots: 1" in str(err.value) or "max_concurrent_trials: 1" in str(err.value)


def test_pack_slots_one_is_the_unpacked_sweep():
    from orchestrator import pack_sweep
    from orchestrator.spec import parse_spec

    spec = parse_spec({"name": "p", "budget_usd": 1, "resources": {"max_concurrent_trials": 3}})
    assert spec.resources.pack_slots == 1 and not pack_sweep.packed(spec, "lora")
    assert pack_sweep.trial_resources(spec, "lora") == {"cpu": 1, "gpu": 0}
    assert pack_sweep.concurrency(spec, "lora") == 3
    assert pack_sweep.start_host(spec, None, "s", "lora") is None
    packed = parse_spec({"name": "p", "budget_usd": 1, "resources": {"pack_slots": 3}})
    assert (
        pack_sweep.concurrency(packed, "lora") == 3 and pack_sweep.concurrency(packed, "full") == 1
    )


def test_the_packed_watchdog_does_not_bill_a_slot_the_whole_gpu_yet_stops_a_silent_one():
    """What the H200 run showed (4 slots revoked at ~11 s, before their first eval): the
    sweep's watchdog floors a trial's live spend at price x time since it was registered, right
    for a trial holding its own GPU, not for a slot paying 1/K of it."""
    from orchestrator.pack_watchdog import PackWatchdog, make_watchdog
    from orchestrator.spec import parse_spec
    from orchestrator.watchdog import SweepControl, Watchdog, _Watched

    price = 36.0  # 1 cent per second
    slot = _Watched(kill=lambda: None, since=0.0, spent_usd=0.05, seen=19.0)  # 5 s of 20 billed
    plain, packed = Watchdog(None, price, SweepControl()), PackWatchdog(None, price, SweepControl())
    assert plain._estimate(slot, 20.0) == pytest.approx(0.20)  # the whole GPU for 20 s
    assert packed._estimate(slot, 20.0) == pytest.approx(0.06)  # its bill + 1 s at full price
    silent = _Watched(kill=lambda: None, since=0.0, spent_usd=0.05, seen=5.0)  # no beat for 15 s
    assert packed._estimate(silent, 20.0) == pytest.approx(0.20)  # still bounded from above
    spec = parse_spec({"name": "p", "budget_usd": 1, "resources": {"pack_slots": 2}})
    assert type(make_watchdog(spec, None, price, SweepControl())) is PackWatchdog
    unpacked = parse_spec({"name": "p", "budget_usd": 1})
    assert type(make_watchdog(unpacked, None, price, SweepControl())) is Watchdog
