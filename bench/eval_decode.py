"""Evaluation time of the two decoding routes, at the product's default eval settings.

    python3 bench/eval_decode.py --device cuda --out bench/results/eval_decode.json

Evaluates the embedded model (SmolLM2-135M-Instruct) with a LoRA adapter on the demo task's
validation rows (the trial defaults: 24 rows, 96 new tokens, batch 8, max_seq_len 256) through
``workers.evaluate.evaluate``, once per route and adapter, after one untimed warm-up:

- ``cache``: decoding steps on transformers' own KV cache (steps as wide as their guesses,
  finished rows leave the batch);
- ``static``: fixed-shape steps on a static KV cache, replayed as a CUDA graph on a GPU.

Both take up to 32 rows at a time within the trial's token allowance (all 24 here; before
2026-11-24's last change the cache route took the trial's batch, 8, at a time).

Adapters: ``fresh`` (B = 0: the base model's own answers, which differ from the references, so
most rows decode in full) and ``trained`` (after ``--train-steps`` optimizer steps of the worker's
loop on the demo task, lr 2e-3, r16 all linear layers: answers mostly match the references).
``same_as_generate`` counts the rows whose generation equals ``generate``'s (transformers'
token-by-token greedy decoding): in bf16 a near-tie can flip either way between any two ways of
batching the same computation. Prints a table and writes rows {"adapter", "route", "seconds",
"decode_steps", "tokens_generated", "rows_generated", "score", "same_as_generate", "device"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _adapters(device: str, train_steps: int):
    import torch

    from workers import demo_task
    from workers.lora import attach_lora
    from workers.model import load_base_model, resolve_model

    ref = resolve_model("embedded")
    base = load_base_model(ref, device=device)
    model = attach_lora(base, rank=16, alpha=32, target_modules="all_linear", dropout=0.05)
    yield "fresh", model
    from workers import fast
    from workers.data import encode_for_training, pad_batch, read_examples
    from workers.model import load_tokenizer

    tokenizer = load_tokenizer(ref)
    train = read_examples(demo_task.split_path("train"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    for step in range(train_steps):
        rows = [encode_for_training(tokenizer, ex, 192) for ex in train[step * 8 : step * 8 + 8]]
        batch = {k: v.to(device) for k, v in pad_batch(rows, tokenizer.pad_token_id).items()}
        fast.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    yield "trained", model


def _timed(model, tokenizer, val, args) -> tuple[dict, float]:
    """``evaluate``'s result and seconds, after one untimed warm-up run."""
    import torch

    from workers import evaluate

    allowance = evaluate.token_allowance(args.chunk, args.max_seq_len)  # as a trial's

    def run():
        return evaluate.evaluate(
            model, tokenizer, val, args.max_seq_len, args.max_new_tokens, args.chunk, allowance
        )

    run()  # warm-up (kernels, allocator)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    got = run()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return got, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=8, help="the trial's batch size")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench/results/eval_decode.json"))
    args = ap.parse_args()
    import torch

    from workers import demo_task, evaluate
    from workers.data import read_examples
    from workers.model import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("embedded"))
    val = read_examples(demo_task.split_path("validation"), "chat", "data.validation")[: args.rows]
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{args.device} CPU"
    out = []
    for adapter, model in _adapters(args.device, args.train_steps):
        plain = evaluate.generate(model, tokenizer, val, args.max_new_tokens)  # token by token
        for route, devices in (("cache", set()), ("static", {args.device})):
            evaluate.STATIC_DEVICES = devices
            got, seconds = _timed(model, tokenizer, val, args)
            same = sum(a == b for a, b in zip(got["generations"], plain, strict=True))
            out.append(
                {
                    "adapter": adapter,
                    "route": route,
                    "seconds": round(seconds, 3),
                    "decode_steps": got["decode_steps"],
                    "tokens_generated": got["tokens_generated"],
                    "rows_generated": got["rows_generated"],
                    "score": round(evaluate.score(got["generations"], [e.answer for e in val]), 4),
                    "same_as_generate": f"{same}/{len(val)}",
                    "device": name,
                }
            )
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.rows} rows, {args.max_new_tokens} new tokens, batch {args.chunk}, {name}")
    print(
        "| adapter | route | seconds | decode steps | tokens | rows decoded | score "
        "| same as generate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        print(
            f"| {r['adapter']} | {r['route']} | {r['seconds']:.3f} | {r['decode_steps']} | "
            f"{r['tokens_generated']} | {r['rows_generated']} | {r['score']:.3f} | "
            f"{r['same_as_generate']} |"
        )


if __name__ == "__main__":
    main()
