"""Training throughput on a GPU: plain PEFT in eager mode vs lorasweep's step, and full FT.

    python3 bench/throughput.py --out bench/results/throughput.json      # needs CUDA

For each Llama shape (random init, bf16, SDPA; 0.5B and 1.5B) at batch 8 x seq 1024 (rows of real
length, no padding), it times optimizer steps of:
- ``peft_eager``: PEFT LoRA r16 alpha 32 on all linear layers, dropout 0 (PEFT's default), the
  model's own loss (``model(**batch).loss``), ``torch.optim.AdamW`` with its defaults;
- ``lorasweep``: the worker's step (``workers/fast.py``) with ``trial.compile: true``: the same
  PEFT adapter under bf16 autocast, rows packed end to end (varlen flash attention), decoder
  layers compiled and replayed as CUDA graphs, chunked loss over labelled tokens,
  fused AdamW;
and full FT both ways, each ``--repeats`` times in alternation (tokens/s is the median of the runs).
Prints a table; writes rows {"model", "method", "impl", "tokens_per_s",
"mfu", "peak_gib", "device"}. LoRA-MFU counts 4*N_matmul + 6*N_lora + 12*layers*d_model*seq
FLOPs per token (full FT: 6*N_matmul + the same attention term) over 989 TFLOP/s (H100 bf16 dense).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 989e12
BATCH, SEQ = 8, 1024
WARMUP, STEPS = 5, 20


def _model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).cuda()


def _setup(model_dir: Path, method: str, impl: str):
    import torch

    from workers import fast, packing
    from workers.lora import attach_lora

    model = _model(model_dir)
    if method == "lora":
        model = attach_lora(model, rank=16, alpha=32, target_modules="all_linear", dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if impl == "lorasweep":
        packing.enable(fast.causal_lm(model))  # the worker packs rows (here: no padding to drop)
        fast.compile_layers(model, cuda_graphs=True)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def step_loss(m, b):
            fast.step_begin()
            return fast.loss(m, b)

    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
        step_loss = lambda m, b: m(**b).loss  # noqa: E731 - the plain path, as users write it
    model.train()
    return model, opt, step_loss


def measure(model_dir: Path, method: str, impl: str, vocab: int) -> dict:
    import torch

    from workers import packing, train

    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model, opt, step_loss = _setup(model_dir, method, impl)
    if impl == "lorasweep":  # the worker's packed batch: the same rows end to end
        rows = [(r, r) for r in ids.tolist()]
        packed = packing.pack(rows, train.GRAPH_BUCKET_TOKENS, SEQ)
        batch = packing.to_device(packed, "cuda")
    torch.cuda.reset_peak_memory_stats()
    first_loss = None
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = step_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = float(loss)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / STEPS
    out = {
        "tokens_per_s": BATCH * SEQ / dt,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_loss": first_loss,
    }
    del model, opt
    torch.cuda.empty_cache()
    return out


def flops_per_token(model_dir: Path, method: str) -> float:
    from transformers import AutoConfig

    from orchestrator.costmodel import ModelDims
    from orchestrator.costmodel import flops_per_token as fpt

    config = AutoConfig.from_pretrained(model_dir)
    dims = ModelDims.from_config(config, 0)
    return fpt(dims, method, SEQ, 16, "all_linear")


def main() -> None:
    import torch

    from workers.synthetic import build_random_llama, build_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/throughput.json"))
    ap.add_argument("--models", nargs="*", default=["llama-0.5b", "llama-1.5b"])
    ap.add_argument("--impls", nargs="*", default=["peft_eager", "lorasweep"])
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each row")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(["warm words for a tokenizer"] * 4)
        for shape in args.models:
            model_dir = build_random_llama(
                Path(tmp) / shape, tok, shape, vocab_size=32000, dtype="bfloat16"
            )
            runs: dict[tuple, list] = {}
            for _ in range(args.repeats):  # alternating, so drift hits every row alike
                for method in ("lora", "full"):
                    for impl in args.impls:
                        t = time.time()
                        m = measure(model_dir, method, impl, 32000)
                        runs.setdefault((method, impl), []).append(m)
                        print(
                            json.dumps(
                                {
                                    "model": shape,
                                    "method": method,
                                    "impl": impl,
                                    "tokens_per_s": round(m["tokens_per_s"]),
                                    "first_loss": round(m["first_loss"], 4),
                                    "wall_s": round(time.time() - t, 1),
                                }
                            ),
                            flush=True,
                        )
            for (method, impl), ms in runs.items():
                tps = statistics.median(m["tokens_per_s"] for m in ms)
                rows.append(
                    {
                        "model": shape,
                        "method": method,
                        "impl": impl,
                        "tokens_per_s": round(tps),
                        "mfu": round(tps * flops_per_token(model_dir, method) / PEAK_FLOPS, 4),
                        "peak_gib": round(max(m["peak_gib"] for m in ms), 2),
                        "device": device,
                    }
                )
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("| model | method | impl | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['method']} | {r['impl']} | {r['tokens_per_s']:,} | "
            f"{r['mfu']:.1%} | {r['peak_gib']:.1f} |"
        )


if __name__ == "__main__":
    main()
