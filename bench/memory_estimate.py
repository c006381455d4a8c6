"""Memory estimator vs measured peak GPU memory, running the worker's own training loop.

    python3 bench/memory_estimate.py --out bench/results/memory_estimate.json   # needs CUDA

For each Llama-shape model (random init, bf16) and method (lora, qlora, full) it runs
``workers.train.run_trial`` for a few steps in a fresh process and compares
``torch.cuda.max_memory_allocated`` with ``workers.memory.estimate``. Prints a table and writes
rows ``{"model", "method", "batch", "seq", "predicted_gib", "measured_gib", "device"}``.
qlora needs bitsandbytes (carry its wheel to the device machine).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (model, method, batch, seq, gradient_checkpointing, rank, targets, used_for_fit)
GRID = [
    # fitted: the coefficients in workers/memory.py come from these shapes
    *[
        (m, meth, 8, 1024, False, 16, "all_linear", True)
        for m in ("llama-0.5b", "llama-1.5b")
        for meth in ("lora", "qlora", "full")
    ],
    ("llama-1.5b", "lora", 8, 1024, True, 16, "all_linear", True),
    ("llama-0.5b", "lora", 2, 2048, False, 64, "attn", True),
    ("llama-1.5b", "lora", 4, 2048, False, 8, "qv", True),
    # held out: measured after the fit, never used for it
    ("llama-0.5b", "lora", 4, 1024, False, 32, "mlp", False),
    ("llama-1.5b", "lora", 8, 1024, True, 16, "attn_mlp", False),
    ("llama-1.5b", "qlora", 8, 1024, False, 16, "qv", False),
    ("llama-0.5b", "qlora", 16, 512, False, 8, "attn", False),
    ("llama-1.5b", "full", 2, 1024, True, 16, "all_linear", False),
    ("llama-0.5b", "full", 2, 4096, False, 16, "all_linear", False),
    ("llama-1.5b", "lora", 2, 2048, False, 128, "all_linear", False),
]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randrange(2, 7)))
        for _ in range(n)
    )


def _prepare(work: Path, shape: str) -> tuple[Path, Path]:
    """A random-init model folder and a JSONL file whose rows exceed 4096 tokens, nearly all of
    them answer (trained on, so the loss computes their logits)."""
    from workers.synthetic import build_random_llama, build_tokenizer

    rng = random.Random(0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": _words(rng, 150)},
                {"role": "assistant", "content": _words(rng, 4500)},
            ]
        }
        for _ in range(16)
    ]
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = work / shape
    if not (model_dir / "config.json").is_file():
        texts = [m["content"] for r in rows for m in r["messages"]]
        build_random_llama(
            model_dir, build_tokenizer(texts), shape, vocab_size=32000, dtype="bfloat16"
        )
    return model_dir, data


def measure_one(
    model_dir: str,
    data: str,
    method: str,
    batch: int,
    seq: int,
    ckpt: bool,
    rank: int,
    targets: str,
) -> dict:
    """Run the worker loop for 3 steps and return measured and predicted peak memory."""
    import torch
    from transformers import AutoConfig

    from workers.lora import TARGET_MODULES
    from workers.memory import ModelShape, estimate
    from workers.train import TrialConfig, run_trial

    cfg = TrialConfig(
        model=model_dir,
        train_path=data,
        validation_path=data,
        method=method,
        rank=rank,
        alpha=2 * rank,
        target_modules=targets,
        learning_rate=1e-4,
        max_steps=3,
        eval_every=3,
        batch_size=batch,
        max_seq_len=seq,
        eval_examples=1,
        max_new_tokens=1,
        device="cuda",
        dtype="bfloat16",
        gradient_checkpointing=ckpt,
        prior_step_s=0.1,
        prior_closing_s=1.0,
    )
    last = run_trial(cfg, lambda m, d: None)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    est = estimate(
        shape,
        method,
        batch=batch,
        seq=seq,
        rank=rank,
        targets=TARGET_MODULES[targets],
        gradient_checkpointing=ckpt,
    )
    return {
        "measured_gib": torch.cuda.max_memory_allocated() / 2**30,
        "static_gib": last.get("static_gib"),
        "predicted_gib": est.total_gib,
        "predicted": est.as_dict(),
        "n_params": shape.n_params,
        "device": torch.cuda.get_device_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/memory_estimate.json")
    parser.add_argument("--one", nargs=8, help=argparse.SUPPRESS)
    work = Path(tempfile.gettempdir()) / "lorasweep-bench"
    parser.add_argument("--work", type=Path, default=work)
    args = parser.parse_args()
    if args.one:
        m, d, meth, b, s, c, r, t = args.one
        print("RESULT " + json.dumps(measure_one(m, d, meth, int(b), int(s), c == "1", int(r), t)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        f"{'model':<12}{'method':<7}{'batch':>6}{'seq':>6}{'ckpt':>6}{'rank':>5} {'targets':<11}"
        f"{'predicted':>10}{'measured':>10}{'error':>8}  fit"
    )
    for shape, method, batch, seq, ckpt, rank, targets, fit in GRID:
        model_dir, data = _prepare(args.work, shape)
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(model_dir),
                str(data),
                method,
                str(batch),
                str(seq),
                "1" if ckpt else "0",
                str(rank),
                targets,
            ],
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{shape:<12}{method:<7} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1][7:])
        err = r["predicted_gib"] / r["measured_gib"] - 1
        print(
            f"{shape:<12}{method:<7}{batch:>6}{seq:>6}{'yes' if ckpt else 'no':>6}{rank:>5} "
            f"{targets:<11}{r['predicted_gib']:>9.2f}G{r['measured_gib']:>9.2f}G{err:>+8.1%}"
            f"  {'fit' if fit else 'held out'}"
        )
        rows.append(
            {
                "model": shape,
                "method": method,
                "batch": batch,
                "seq": seq,
                "gradient_checkpointing": ckpt,
                "rank": rank,
                "targets": targets,
                "used_for_fit": fit,
                "predicted_gib": round(r["predicted_gib"], 3),
                "measured_gib": round(r["measured_gib"], 3),
                "device": r["device"],
                "static_gib": r["static_gib"],
                "n_params": r["n_params"],
                "predicted_breakdown_gib": r["predicted"],
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
