"""A real sweep on the GPU through the CLI: `lorasweep run` of examples/gpu-h200.yaml (local Ray,
Optuna TPE in sqlite, ASHA, MLflow in sqlite, the budget ledger), measured from outside.

    python3 bench/gpu_sweep.py --mode single --out bench/results/gpu_sweep.json   # on the H200
    python3 bench/gpu_sweep.py --short --out /tmp/gpu_sweep.json                  # CPU, ~1 min

The CLI runs as a child process (``python -m orchestrator.cli run SPEC --new --data-dir DIR``),
so its local Ray cluster is this script's descendant. Afterwards the sweep's results are read back
from its stores, not from the CLI's output: the trials (status, score, cost) from MLflow's
parent and child runs, the spend from the ledger (``lorasweep_accounts``). Spend is checked
against two outside clocks: ``outside_held_usd``, the seconds the OS saw Ray's paid worker
processes exist (``tests/outside_clock.py``) x the price; ``outside_wall_usd``, the CLI's whole
wall time x GPUs x price (what renting the GPU for the sweep costs: driver, Ray start and base
eval included). The cap must hold by both. ``trials_completed``: trials that ran to max_steps;
``trials_ended``: those and the ones ASHA stopped at a rung (each did its job for the search);
``trials_per_gpu_hour``: ``trials_ended`` over the wall time's GPU-hours.

``--mode packed`` runs the same spec and seed with ``resources.pack_slots: K`` (``--pack-slots``,
default 4): the LoRA trials as K slots of one pack on the GPU; its outside clock counts the pack's
host process (``ray::PackHost``) and the base eval, which hold the GPU there.

``--short`` runs the same spec shrunk for a CPU (the tiny random-init Llama of the tests, 2
trials of 4 steps, "cpu" priced at 36 $/h so that seconds cost cents): it checks this script
end to end where there is no GPU. ``--deadline-s``: past it the CLI gets SIGINT (the sweep
stops gracefully, every account settled) so a device call's time limit cannot lose the row.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/outside_clock.py: the OS's view of Ray workers

SPEC = ROOT / "examples" / "gpu-h200.yaml"
ENDED = ("completed", "pruned")  # ran to max_steps, or to the ASHA rung that stopped it


def _short_spec(raw: dict, work: Path) -> dict:
    """The spec shrunk for a CPU: the tests' tiny model and data, 2 trials of 4 steps."""
    from workers.synthetic import build_demo_inputs

    model, data = build_demo_inputs(work / "inputs")
    raw = dict(raw, name=f"{raw['name']}-short", max_trials=2, budget_usd=1.0)
    raw["model"] = {"name_or_path": str(model)}
    raw["data"] = {"source": "files", **{k: str(v) for k, v in data.items()}}
    raw["search_space"] = {"preset": "default", "rank": {"choices": [2, 4]}}
    raw["trial"] = {
        "max_steps": 4,
        "eval_every": 2,
        "batch_size": 4,
        "max_seq_len": 160,
        "eval_examples": 4,
        "max_new_tokens": 8,
    }
    raw["resources"] = {"accelerator": "cpu", "cpus_per_trial": 1, "max_concurrent_trials": 1}
    raw["prices"] = {"overrides": {"cpu": 36.0}}
    return raw


def _run_cli(spec_path: Path, data_dir: Path, deadline_s: float, log_path: Path, packed: bool):
    """Run `lorasweep run` as a child; returns (exit code, wall_s, outside meter)."""
    from outside_clock import PACKED_TITLES, PAID_TITLES, ProcessMeter

    # packed, the GPU is held by the pack's host (and the base eval), not by trial actors
    titles = PACKED_TITLES if packed else PAID_TITLES

    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(spec_path), "--new"]
    cmd += ["--data-dir", str(data_dir)]
    env = dict(os.environ, COLUMNS="160", PYTHONPATH=os.pathsep.join(_pythonpath()))
    with open(log_path, "w") as log, ProcessMeter(titles=titles) as meter:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # graceful: the sweep settles and ends "interrupted"
            code = proc.wait()
        wall_s = time.monotonic() - t0
    return code, wall_s, meter


def _pythonpath() -> list[str]:
    extra = os.environ.get("PYTHONPATH", "")
    return [str(ROOT)] + [p for p in extra.split(os.pathsep) if p]


def _read_back(spec, data_dir: Path) -> dict:
    """The sweep's trials from MLflow and its spend from the ledger."""
    from orchestrator import leaderboard
    from orchestrator.store import Store
    from orchestrator.sweep import storage_urls
    from orchestrator.tracking import SWEEP_TAG

    spec = spec.model_copy(
        update={"storage": spec.storage.model_copy(update={"data_dir": data_dir})}
    )
    _, tracking_uri, _, ledger_url = storage_urls(spec)
    parent = leaderboard.find_sweep(tracking_uri, None)
    sweep_id = parent.data.tags[SWEEP_TAG]
    rows = leaderboard.trial_rows(tracking_uri, parent)
    best = leaderboard.best_row(rows)
    store = Store(ledger_url)
    try:
        totals = store.totals(sweep_id)
        sweep_row = store.sweep(sweep_id)
    finally:
        store.close()
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "sweep_id": sweep_id,
        "trials": len(rows),
        "trials_completed": sum(1 for r in rows if r.status == "completed"),
        "trials_ended": sum(1 for r in rows if r.status in ENDED),
        "statuses": statuses,
        "spent_usd": totals.spent_usd,
        "trials_cost_usd": sum(r.cost_usd for r in rows),
        "best_score": None if best is None else best.score,
        "end_reason": sweep_row.end_reason if sweep_row else None,
    }


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def measure(mode: str, short: bool, work: Path, deadline_s: float, pack_slots: int = 4) -> dict:
    from orchestrator.prices import load_catalog, trial_price_usd_per_hour
    from orchestrator.spec import load_spec

    work.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(SPEC.read_text())
    if short:
        raw = _short_spec(raw, work)
    if mode == "packed":  # the same spec and seed, its trials as slots of one shared pack
        raw["resources"].update(pack_slots=pack_slots, max_concurrent_trials=1)
    spec_path = work / f"{raw['name']}-{mode}.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(spec_path)  # refuse a bad spec here, before any money is spent
    res = spec.resources
    catalog = load_catalog(spec.prices.catalog, spec.prices.overrides, spec.prices.market)
    # one trial's resources per hour; the machine holds max_concurrent_trials of them
    price = trial_price_usd_per_hour(
        catalog, res.accelerator, res.gpus_per_trial, res.cpus_per_trial
    )
    gpus = max(res.gpus_per_trial, 1) * res.max_concurrent_trials
    data_dir = work / f"data-{mode}"
    code, wall_s, meter = _run_cli(
        spec_path, data_dir, deadline_s, work / f"cli-{mode}.log", packed=mode == "packed"
    )
    found = _read_back(spec, data_dir)
    gpu_hours = wall_s * gpus / 3600
    return {
        "mode": mode,
        "device": _device(),
        "trials": found["trials"],
        "trials_completed": found["trials_completed"],
        "trials_ended": found["trials_ended"],
        "spent_usd": round(found["spent_usd"], 6),
        "budget_usd": spec.budget_usd,
        "best_score": found["best_score"],
        "sweep_wall_s": round(wall_s, 1),
        "trials_per_gpu_hour": round(found["trials_ended"] / gpu_hours, 1),
        "ray": True,
        "accelerator": res.accelerator,
        "price_usd_per_hour": price,
        "outside_held_usd": round(meter.cost_usd(price), 6),
        "outside_wall_usd": round(wall_s * res.max_concurrent_trials * price / 3600, 6),
        "statuses": found["statuses"],
        "end_reason": found["end_reason"],
        "cli_exit_code": code,
        "sweep_id": found["sweep_id"],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def _merge(out: Path, row: dict) -> list[dict]:
    """Rows of ``out`` with ``row`` replacing the one of its mode and device."""
    rows = json.loads(out.read_text()) if out.is_file() else []
    rows = [r for r in rows if (r["mode"], r["device"]) != (row["mode"], row["device"])]
    return sorted(rows + [row], key=lambda r: (r["device"], r["mode"] != "single"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("single", "packed"), default="single")
    ap.add_argument("--pack-slots", type=int, default=4, help="packed: trials per pack")
    ap.add_argument("--short", action="store_true", help="CPU: tiny model, 2 trials of 4 steps")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    ap.add_argument("--deadline-s", type=float, default=480.0, help="SIGINT the CLI after this")
    ap.add_argument("--out", type=Path, default=None, help="JSON rows to merge the result into")
    args = ap.parse_args(argv)
    if args.work is None:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="gpu-sweep-"))
    row = measure(args.mode, args.short, args.work, args.deadline_s, args.pack_slots)
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_merge(args.out, row), indent=1) + "\n")
    over = max(row["spent_usd"], row["outside_held_usd"]) > row["budget_usd"]
    return 1 if over or row["cli_exit_code"] not in (0, 130) else 0


if __name__ == "__main__":
    sys.exit(main())
