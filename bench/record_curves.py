"""Record the tabular benchmark behind ``bench/search_efficiency.py``: real learning curves.

    python3 bench/record_curves.py --device cuda --grid v2 --shard 0/3 --out curves-0.jsonl
    python3 bench/record_curves.py --grid v2 --merge curves-*.jsonl --out bench/data/curves.json

Runs ``workers.train.run_trial`` (the worker's own loop, no Ray) on the embedded model and the
embedded demo task for every config of a grid (``GRIDS``): LoRA configs (learning rate x rank x
target-module set) and full-FT runs (learning rates), each for the grid's ``max_steps`` with an
eval every ``eval_every`` steps. Every eval records the score, eval loss, billed seconds and cost,
so a replay can stop a config at any rung and know what it would have cost. One JSON line per
config is appended as soon as it finishes (a killed run keeps what it finished). A process runs
its configs one at a time, after an unrecorded 2-step warm-up trial (its imports and first CUDA
use); shards run side by side share the GPU and bill that sharing (v1 ran six at once, v2 its two
shards one after the other).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRIDS = {
    # the first table (2026-11-23): 60 steps, every LoRA config near the best from lr 2e-3 up
    "v1": {
        "lora_lrs": (2e-4, 6e-4, 2e-3, 6e-3),
        "ranks": (4, 8, 16, 64),
        "targets": ("attn", "attn_mlp", "all_linear"),
        "full_lrs": (1e-5, 3e-5, 1e-4, 3e-4),
        "max_steps": 60,
        "eval_every": 12,
    },
    # the default search space at the spec's default trial length (30 steps): lr log-even over
    # the default range 1e-4..1e-2, full FT at a tenth of each LoRA rate
    "v2": {
        "lora_lrs": (1e-4, 2.5e-4, 6.3e-4, 1.6e-3, 4e-3, 1e-2),
        "ranks": (4, 16, 64),
        "targets": ("attn", "attn_mlp", "all_linear"),
        "full_lrs": (1e-5, 2.5e-5, 6.3e-5, 1.6e-4, 4e-4, 1e-3),
        "max_steps": 30,
        "eval_every": 6,
    },
}
BATCH, SEQ = 8, 192
EVAL_EXAMPLES, MAX_NEW_TOKENS = 24, 80


def grid(name: str = "v1") -> list[dict]:
    g = GRIDS[name]
    lora = [
        {"method": "lora", "learning_rate": lr, "rank": r, "alpha": 32, "target_modules": t}
        for lr, r, t in itertools.product(g["lora_lrs"], g["ranks"], g["targets"])
    ]
    full = [
        {"method": "full", "learning_rate": lr, "rank": 0, "alpha": 0, "target_modules": "all"}
        for lr in g["full_lrs"]
    ]
    configs = lora + full
    for i, c in enumerate(configs):
        c["config_id"] = f"{c['method']}-{i:02d}"
    return configs


def record(
    config: dict, device: str, price_usd_per_hour: float, grid_name: str, steps: int | None = None
) -> dict:
    from workers import demo_task
    from workers.model import resolve_model
    from workers.train import TrialConfig, run_trial

    curve: list[dict] = []

    def report(metrics: dict, _adapter_dir: Path) -> None:
        curve.append(
            {
                "step": metrics["step"],
                "score": metrics["score"],
                "eval_loss": round(metrics["eval_loss"], 5),
                "train_loss": round(metrics["train_loss"], 5),
                "billed_s": round(metrics["billed_s"], 3),
                "cost_usd": metrics["cost_usd"],
                "tokens": metrics["tokens"],
            }
        )

    hp = {k: v for k, v in config.items() if k != "config_id"}
    if hp["method"] == "full":
        hp.update(rank=8, alpha=16, target_modules="all_linear")  # ignored by full FT
    cfg = TrialConfig(
        model=resolve_model("embedded"),
        train_path=str(demo_task.split_path("train")),
        validation_path=str(demo_task.split_path("validation")),
        max_steps=steps or GRIDS[grid_name]["max_steps"],
        eval_every=steps or GRIDS[grid_name]["eval_every"],
        batch_size=BATCH,
        max_seq_len=SEQ,
        eval_examples=EVAL_EXAMPLES,
        max_new_tokens=MAX_NEW_TOKENS,
        price_usd_per_hour=price_usd_per_hour,
        device=device,
        **hp,
    )
    last = run_trial(cfg, report)
    return {**config, "curve": curve, "phases_s": last.get("phases_s", {})}


def _model_facts() -> dict:
    """What the replay's cost model needs: the model's shape and the padded tokens per row that
    the sweep's own preflight would price (``orchestrator.preflight``)."""
    from dataclasses import asdict

    from transformers import AutoConfig

    from orchestrator.preflight import _tokens_per_example
    from workers import demo_task
    from workers.data import read_examples
    from workers.memory import ModelShape
    from workers.model import resolve_model

    ref = resolve_model("embedded")
    train = read_examples(demo_task.split_path("train"))
    return {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "model_shape": asdict(ModelShape.from_config(AutoConfig.from_pretrained(ref))),
        "seq_len_tokens": _tokens_per_example(ref, train, SEQ),
    }


def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, 1 thread"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--accelerator", default="H100", help="price catalog row for billed cost")
    ap.add_argument("--grid", default="v1", choices=sorted(GRIDS))
    ap.add_argument("--shard", default="0/1", help="i/n: record every n-th config from i")
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", nargs="*", default=[], help="JSONL files of configs already done")
    ap.add_argument("--merge", nargs="*", help="JSONL shards to merge into one table (--out)")
    ap.add_argument("--note", default="", help="with --merge: how the shards were run")
    args = ap.parse_args()
    from orchestrator.prices import load_catalog

    price = load_catalog()[args.accelerator].price_usd_per_hour
    if args.merge:
        rows = [json.loads(line) for p in args.merge for line in Path(p).read_text().splitlines()]
        rows.sort(key=lambda r: r["config_id"])
        table = {
            "command": f"python3 bench/record_curves.py --device cuda --grid {args.grid} "
            "--shard i/n (see docstring)",
            "machine": rows[0]["machine"],
            "accelerator": args.accelerator,
            "price_usd_per_hour": price,
            "grid": args.grid,
            "max_steps": GRIDS[args.grid]["max_steps"],
            "eval_every": GRIDS[args.grid]["eval_every"],
            "batch_size": BATCH,
            "max_seq_len": SEQ,
            "eval_examples": EVAL_EXAMPLES,
            **_model_facts(),
            "note": args.note,
            "configs": rows,
        }
        Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
        print(f"{len(rows)} configs -> {args.out}")
        return
    i, n = map(int, args.shard.split("/"))
    machine = _machine(args.device)
    done = {json.loads(line)["config_id"] for p in args.skip for line in open(p)}
    # the process's imports and first CUDA use, paid once per worker, stay out of the table
    record(grid(args.grid)[0], args.device, price, args.grid, steps=2)
    for config in [c for c in grid(args.grid) if c["config_id"] not in done][i::n]:
        t = time.time()
        row = record(config, args.device, price, args.grid)
        row.update(machine=machine, date=time.strftime("%Y-%m-%d"))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        best = max(p["score"] for p in row["curve"])
        print(f"{config['config_id']}  best {best:.3f}  {time.time() - t:.1f}s", flush=True)


if __name__ == "__main__":
    main()
