"""K LoRA trials packed on one frozen base against the same K trials run one after another.

    python3 bench/packing.py --out bench/results/packing.json            # needs CUDA (H200)
    python3 bench/packing.py --device cpu --models tiny --ks 1 2 --steps 2 --out /tmp/p.json
    python3 bench/packing.py --ks fit --no-sequential --eager      # the largest K that fits

For each Llama shape (random init, bf16; 0.5B and 1.5B) and K in 1, 2, 4, 8 where the memory
estimate (``workers.memory.pick_pack_size``) says a pack fits the GPU (``--ks fit``: the largest K
<= 16 it says fits, the pack ``resources.pack_slots`` lets through), K trials (LoRA r16 alpha 32
on all linear layers, dropout 0, each its own seed, data and learning rate) at batch 8 x 1024 per
trial are trained:
- ``sequential``: one after another with today's fast step (``workers/fast.py`` as
  ``trial.compile: true`` runs it: PEFT adapter, rows packed end to end, decoder layers compiled
  and replayed as CUDA graphs, chunked loss, fused AdamW). One process and one compiled model
  serve the K trials (the adapter re-initialised in place), so compiling is paid once and not
  timed; tokens/s is all K trials' timed tokens over their timed seconds.
- ``packed``: the K trials as K slots of one ``workers.packed.Pack`` (compiled the same way, or
  with ``--eager`` not compiled: the pack a sweep's pack host runs), one step training all K; the
  slots are removed and the next K added without reloading the base. A pack that runs out of GPU
  memory is a row with ``"oom": true`` (the estimate said it fits: the estimate is wrong).
Each trial runs ``--warmup`` untimed then ``--steps`` timed steps. ``max_loss_diff`` is the largest
difference between a slot's loss and the same trial's sequential loss, over all its steps (bf16:
the two paths round differently). ``peak_gib``: the most allocated at once; for ``sequential``,
that of one trial (K separate trial processes hold K times that). ``predicted_gib`` (and, the
same, ``estimate_gib`` of earlier rows): what ``workers.memory.estimate_pack`` predicted for the
pack (for ``sequential``: ``estimate`` of one trial). MFU counts the LoRA FLOPs of
``bench/throughput.py`` (4*N_matmul + 6*N_lora + attention, per token) over 989 TFLOP/s.
Batch building on the CPU (``packing.pack``, ``Pack.prepare``) is left out of both timings, as
``bench/throughput.py`` leaves it out. Writes rows {"model", "k", "impl", "tokens_per_s", "mfu",
"peak_gib", "max_loss_diff", "device", "seq", "estimate_gib", "predicted_gib", "compiled", "oom",
"memory_gib"} and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 989e12
BATCH, SEQ = 8, 1024
RANK, ALPHA = 16, 32
LEARNING_RATES = (1e-3, 5e-4, 2e-3, 1e-4, 3e-3, 7e-4, 1.5e-3, 4e-4)  # one per trial


def _trial(i: int, model: str, steps: int, device: str):
    from workers.train import TrialConfig

    return TrialConfig(
        model=model,
        train_path="",
        validation_path="",
        rank=RANK,
        alpha=ALPHA,
        target_modules="all_linear",
        dropout=0.0,
        learning_rate=LEARNING_RATES[i % len(LEARNING_RATES)],
        max_steps=steps,
        batch_size=BATCH,
        max_seq_len=SEQ,
        seed=i,
        device=device,
    )


def _rows(trial: int, step: int, vocab: int, seq: int) -> list:
    """Trial ``trial``'s batch at ``step``: BATCH random rows of ``seq`` tokens, every token
    labelled (the same rows for both paths)."""
    import torch

    g = torch.Generator().manual_seed(1000 * trial + step)
    ids = torch.randint(0, vocab, (BATCH, seq), generator=g).tolist()
    return [(r, r) for r in ids]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import torch

    torch._dynamo.reset()  # compiled graphs and their CUDA-graph memory pools
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def sequential(model_dir: Path, k_max: int, args, vocab: int) -> list[dict]:
    """Today's fast step, trial after trial on one compiled model: per trial its losses, timed
    seconds and tokens, and the peak of the first trial."""
    import torch

    from workers import fast, packing
    from workers.lora import attach_lora
    from workers.model import load_base_model
    from workers.train import GRAPH_BUCKET_TOKENS, _lr_at

    graphs = args.device == "cuda"
    model = load_base_model(str(model_dir), "auto", args.device)
    packing.enable(model)
    total = args.warmup + args.steps
    out = []
    for i in range(k_max):
        cfg = _trial(i, str(model_dir), total, args.device)
        model = attach_lora(
            model, rank=RANK, alpha=ALPHA, target_modules="all_linear", dropout=0.0, seed=i
        )
        if i == 0 and graphs:
            fast.compile_layers(model, cuda_graphs=True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=graphs)
        losses, seconds, tokens = [], 0.0, 0
        for step in range(total):
            rows = _rows(i, step, vocab, args.seq)
            if graphs:
                batch = packing.pack(rows, GRAPH_BUCKET_TOKENS, max(args.seq, GRAPH_BUCKET_TOKENS))
                fast.step_begin()
            else:
                batch = packing.pack(rows)
            _sync(args.device)
            t = time.perf_counter()  # batch building on the CPU left out, as for the pack
            batch = packing.to_device(batch, args.device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = fast.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # synchronises
            if step >= args.warmup:
                seconds += time.perf_counter() - t
                tokens += sum(len(r) for r, _ in rows)
        out.append({"losses": losses, "seconds": seconds, "tokens": tokens})
        if i == 0:
            out[0]["peak_gib"] = _peak_gib(args.device)
        print(
            json.dumps({"sequential_trial": i, "tokens_per_s": round(tokens / seconds)}), flush=True
        )
        del opt, params
    del model
    _free(args.device)
    return out


def packed(model_dir: Path, ks: list[int], args, vocab: int, alone: list[dict]) -> dict:
    """The same trials as K slots of one pack, for each K (slots refilled, base kept)."""
    import torch

    from workers.model import load_base_model
    from workers.packed import Pack

    graphs = args.device == "cuda" and not args.eager
    pack = Pack(
        load_base_model(str(model_dir), "auto", args.device),
        device=args.device,
        compile=graphs,
        bucket_tokens=128 if graphs else None,
        max_length=args.seq,
    )
    total = args.warmup + args.steps
    results = {}
    for k in ks:
        _free(args.device)
        keys = [pack.add(_trial(i, str(model_dir), total, args.device)) for i in range(k)]
        seconds, tokens = 0.0, 0
        try:
            for step in range(total):
                rows = pack.prepare(
                    {key: _rows(i, step, vocab, args.seq) for i, key in enumerate(keys)}
                )
                _sync(args.device)
                t = time.perf_counter()
                out = pack.step(rows)  # to the GPU, forward, backward, K optimizers; synchronises
                if step >= args.warmup:
                    seconds += time.perf_counter() - t
                    tokens += sum(s.tokens for s in out.values())
        except torch.cuda.OutOfMemoryError as exc:
            results[k] = {"oom": True, "peak_gib": _peak_gib(args.device), "error": str(exc)[:200]}
            print(json.dumps({"packed_k": k, **results[k]}), flush=True)
            for key in keys:
                pack.remove(key)
            continue
        diff = (
            None
            if alone is None
            else max(
                abs(loss - ref)
                for i, key in enumerate(keys)
                for (_, loss), ref in zip(pack.slots[key].losses, alone[i]["losses"], strict=True)
            )
        )
        results[k] = {
            "oom": False,
            "tokens_per_s": tokens / seconds,
            "peak_gib": _peak_gib(args.device),
            "max_loss_diff": diff,
        }
        print(json.dumps({"packed_k": k, **{n: v for n, v in results[k].items()}}), flush=True)
        for key in keys:
            pack.remove(key)
    del pack
    _free(args.device)
    return results


def _shape(model_dir: Path):
    from transformers import AutoConfig

    from workers.memory import ModelShape

    return ModelShape.from_config(AutoConfig.from_pretrained(model_dir))


def _flops_per_token(model_dir: Path, seq: int) -> float:
    from transformers import AutoConfig

    from orchestrator.costmodel import ModelDims, flops_per_token

    dims = ModelDims.from_config(AutoConfig.from_pretrained(model_dir), 0)
    return flops_per_token(dims, "lora", seq, RANK, "all_linear")


def main() -> None:
    import torch

    from workers.memory import estimate_pack, pick_pack_size
    from workers.synthetic import build_random_llama, build_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/packing.json"))
    ap.add_argument("--models", nargs="*", default=["llama-0.5b", "llama-1.5b"])
    ap.add_argument(
        "--ks",
        nargs="*",
        default=["1", "2", "4", "8"],
        help="pack sizes; fit: the largest K <= 16 the memory estimate says fits",
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per trial (compiling)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per row")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script's logic")
    ap.add_argument(
        "--no-sequential", action="store_true", help="packed rows only (no loss comparison)"
    )
    ap.add_argument(
        "--eager", action="store_true", help="packs not compiled (what a sweep's pack host runs)"
    )
    args = ap.parse_args()
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    memory_gib = torch.cuda.mem_get_info()[1] / 2**30 if cuda else 24.0
    vocab = 32000
    rows: list[dict] = []
    out_path = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(["warm words for a tokenizer"] * 4)
        for name in args.models:
            t0 = time.time()
            dtype = "bfloat16" if cuda else "float32"
            model_dir = build_random_llama(Path(tmp) / name, tok, name, vocab, dtype=dtype)
            shape = _shape(model_dir)
            fits = pick_pack_size(
                shape,
                "lora",
                batch=BATCH,
                seq=args.seq,
                memory_gib=memory_gib,
                rank=RANK,
                max_slots=16,
            )
            asked = sorted({fits if k == "fit" else int(k) for k in args.ks})
            ks = [k for k in asked if 1 <= k <= fits]
            print(
                json.dumps({"model": name, "ks": ks, "memory_gib": round(memory_gib, 1)}),
                flush=True,
            )
            if not ks:
                continue
            alone = None if args.no_sequential else sequential(model_dir, max(ks), args, vocab)
            pack = packed(model_dir, ks, args, vocab, alone)
            fpt = _flops_per_token(model_dir, args.seq)
            one_gib = _one(shape, args.seq)  # a trial alone (sequential rows)
            for k in ks:
                if pack[k]["oom"]:
                    rows.append(
                        {
                            "model": name,
                            "k": k,
                            "impl": "packed",
                            "oom": True,
                            "peak_gib": pack[k]["peak_gib"],
                            "device": device,
                            "seq": args.seq,
                            "compiled": cuda and not args.eager,
                            "memory_gib": round(memory_gib, 1),
                            "predicted_gib": round(_pack_gib(shape, k, args.seq), 2),
                        }
                    )
                    continue
                est = estimate_pack(
                    shape, "lora", [(RANK, "all-linear")] * k, batch=BATCH, seq=args.seq
                ).total_gib
                runs = [
                    (
                        "packed",
                        pack[k]["tokens_per_s"],
                        pack[k]["peak_gib"],
                        pack[k]["max_loss_diff"],
                        est,
                    )
                ]
                if alone is not None:
                    seq_tps = sum(a["tokens"] for a in alone[:k]) / sum(
                        a["seconds"] for a in alone[:k]
                    )
                    runs.insert(0, ("sequential", seq_tps, alone[0]["peak_gib"], None, one_gib))
                for impl, tps, peak, diff, gib in runs:
                    rows.append(
                        {
                            "model": name,
                            "k": k,
                            "impl": impl,
                            "tokens_per_s": round(tps),
                            "mfu": round(tps * fpt / PEAK_FLOPS, 4),
                            "peak_gib": None if peak is None else round(peak, 2),
                            "max_loss_diff": None if diff is None else round(diff, 5),
                            "device": device,
                            "seq": args.seq,
                            "estimate_gib": round(gib, 2),
                            "predicted_gib": round(gib, 2),
                            "compiled": cuda and (impl == "sequential" or not args.eager),
                            "oom": False,
                            "memory_gib": round(memory_gib, 1),
                        }
                    )
            out_path.write_text(json.dumps(rows, indent=1) + "\n")  # after each model
            print(json.dumps({"model": name, "wall_s": round(time.time() - t0)}), flush=True)
    out_path.write_text(json.dumps(rows, indent=1) + "\n")
    _table(rows)


def _pack_gib(shape, k: int, seq: int) -> float:
    from workers.memory import estimate_pack

    return estimate_pack(shape, "lora", [(RANK, "all-linear")] * k, batch=BATCH, seq=seq).total_gib


def _one(shape, seq: int) -> float:
    from workers.memory import estimate

    return estimate(shape, "lora", batch=BATCH, seq=seq, rank=RANK).total_gib


def _table(rows: list[dict]) -> None:
    single = {(r["model"], r["k"]): r for r in rows if r["impl"] == "sequential"}
    print(
        "| model | K | impl | compiled | tokens/s | x sequential | MFU | peak GiB | "
        "peak / K trials | predicted GiB | max loss diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(
                f"| {r['model']} | {r['k']} | {r['impl']} | {r['compiled']} | OOM | | | "
                f"{r['peak_gib'] or 0:.1f} | | {r['predicted_gib']:.1f} | |"
            )
            continue
        s = single.get((r["model"], r["k"]))
        speedup = f"{r['tokens_per_s'] / s['tokens_per_s']:.2f}x" if s else ""
        sep = ""
        if s and r["peak_gib"] and s["peak_gib"]:
            sep = f"{r['peak_gib'] / (r['k'] * s['peak_gib']):.2f}"
        diff = "" if r["max_loss_diff"] is None else f"{r['max_loss_diff']:.4f}"
        print(
            f"| {r['model']} | {r['k']} | {r['impl']} | {r['compiled']} | {r['tokens_per_s']:,} | "
            f"{speedup} | {r['mfu']:.1%} | {r['peak_gib'] or 0:.1f} | "
            f"{sep} | {r['predicted_gib']:.1f} | {diff} |"
        )


if __name__ == "__main__":
    main()
