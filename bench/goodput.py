"""Goodput of a real sweep: the share of billed seconds spent in optimizer steps.

    .venv/bin/python bench/goodput.py --out bench/results/goodput.json      # CPU, ~20 min

Runs ``lorasweep`` itself (local Ray, sqlite MLflow and Optuna, the budget ledger) on the embedded
model and demo task: 16 short LoRA trials (30 steps of batch 4, the spec's default length,
evaluated once at the end), 2 at a time, 1 core each.

    python3 bench/goodput.py --no-ray --device cuda --steps 60 --out goodput_gpu.json  # GPU
    python3 bench/goodput.py --no-ray --device cuda --trial-defaults --out goodput_gpu_defaults.json

runs the same number of trials one after another in one process with the worker's own loop (no
Ray, which the GPU machines here lack): what a reused Tune worker does, minus Tune.
Every trial reports where
its billed seconds went (load, data, step, eval, checkpoint, report = handing results and the
adapter to Tune, logged to MLflow by the driver); idle is what those do not explain (actor start,
imports, waiting to be released). Reads the per-trial numbers back from MLflow, prints a table and
writes {"trials", "billed_s", "step_s", "goodput", "breakdown": {...}, "device"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("load", "data", "step", "eval", "checkpoint", "report", "idle")


SHORT_TRIAL = {
    "max_steps": 30,
    "eval_every": None,  # once, at the end
    "batch_size": 4,
    "max_seq_len": 192,
    "eval_examples": 4,
    "max_new_tokens": 48,
}
DEFAULT_TRIAL = {  # orchestrator.spec.TrialSpec's defaults
    "max_steps": 30,
    "eval_every": 10,
    "batch_size": 8,
    "max_seq_len": 256,
    "eval_examples": 24,
    "max_new_tokens": 96,
}


def spec_dict(data_dir: Path, trials: int, steps: int) -> dict:
    return {
        "name": "goodput",
        "budget_usd": 1.0,
        "model": {"name_or_path": "embedded"},
        "data": {"source": "embedded"},
        "search_space": {"preset": "default", "rank": {"choices": [4, 8, 16]}},
        "trial": {**SHORT_TRIAL, "max_steps": steps, "eval_every": steps},
        "resources": {"accelerator": "cpu", "cpus_per_trial": 1, "max_concurrent_trials": 2},
        "max_trials": trials,
        "early_stopping": {"enabled": False},
        "storage": {"data_dir": str(data_dir)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench/results/goodput.json"))
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--steps",
        type=int,
        default=SHORT_TRIAL["max_steps"],
        help="optimizer steps per trial, evaluated once at the end",
    )
    ap.add_argument(
        "--trial-defaults",
        action="store_true",
        help="--no-ray trials shaped as a spec's defaults: 30 steps of batch 8 (max_seq_len 256), "
        "an eval every 10 steps of 24 rows x 96 new tokens",
    )
    ap.add_argument(
        "--keep-graphs",
        choices=("on", "off"),
        default="on",
        help="--no-ray on CUDA, off: every eval captures its decoding graph anew (as before)",
    )
    args = ap.parse_args()
    if args.keep_graphs == "off":
        from workers import static_decode

        static_decode.KEEP_MEMORY_FRACTION = 0.0  # nothing fits: never kept
    if args.no_ray:
        shape = DEFAULT_TRIAL if args.trial_defaults else {**SHORT_TRIAL, "max_steps": args.steps}
        totals, billed, n = in_process(args.trials, args.device, shape)
        write(args.out, n, billed, totals, _device(args.device) + ", trials in one process")
        return
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "goodput.yaml"
        path.write_text(yaml.safe_dump(spec_dict(Path(tmp) / "data", args.trials, args.steps)))
        result = run_sweep(load_spec(path), Console())
        client = MlflowClient(tracking_uri=result.tracking_uri)
        totals = dict.fromkeys(PHASES, 0.0)
        billed = 0.0
        for row in result.rows:
            metrics = client.get_run(row.run_id).data.metrics
            billed += metrics["billed_s"]
            for p in PHASES:
                totals[p] += metrics.get(f"phase_{p}_s", 0.0)
    device = f"{os.cpu_count()}-core {platform.machine()} CPU, local Ray, 1 core per trial"
    write(args.out, len(result.rows), billed, totals, device)


def _device(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core {platform.machine()} CPU"


def in_process(trials: int, device: str, shape: dict) -> tuple[dict, float, int]:
    """Trials back to back in this process, configs drawn from the default space."""
    import random

    from workers import demo_task
    from workers.model import resolve_model
    from workers.train import TrialConfig, run_trial

    rng = random.Random(0)
    totals, billed = dict.fromkeys(PHASES, 0.0), 0.0
    for i in range(trials):
        cfg = TrialConfig(
            model=resolve_model("embedded"),
            train_path=str(demo_task.split_path("train")),
            validation_path=str(demo_task.split_path("validation")),
            learning_rate=10 ** rng.uniform(-4, -2),
            rank=rng.choice([4, 8, 16]),
            alpha=32,
            target_modules=rng.choice(["attn", "attn_mlp", "all_linear"]),
            **{**shape, "eval_every": shape["eval_every"] or shape["max_steps"]},
            device=device,
            seed=i,
        )
        last = run_trial(cfg, lambda m, d: None)
        billed += last["billed_s"]
        for p, v in last["phases_s"].items():
            totals[p] += v
        totals["idle"] += last["billed_s"] - sum(last["phases_s"].values())
        print(f"trial {i + 1}: {last['billed_s']:.1f} s billed, phases {last['phases_s']}")
    return totals, billed, trials


def write(path: str, trials: int, billed: float, totals: dict, device: str) -> None:
    out = {
        "trials": trials,
        "billed_s": round(billed, 2),
        "step_s": round(totals["step"], 2),
        "goodput": round(totals["step"] / billed, 4),
        "breakdown": {p: round(v, 2) for p, v in totals.items()},
        "device": device,
    }
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{out['trials']} trials, {billed:.1f} billed s, goodput {out['goodput']:.1%}")
    print("| phase | seconds | share of billed |")
    print("|---|---|---|")
    for p, v in totals.items():
        print(f"| {p} | {v:.1f} | {v / billed:.1%} |")


if __name__ == "__main__":
    main()
