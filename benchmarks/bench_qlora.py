"""A QLoRA training step, end to end: HF + PEFT + bitsandbytes eager vs slothai
(patch + regional compile) [vs torch.compile(model) with --full], same batches.

    python benchmarks/bench_qlora.py [--model llama-1b] [--full]

Llama-3.2-1B shape (random weights, tied 128256 vocab), NF4 double-quant, bf16
compute, LoRA r=32 alpha=64 on all 7 projections, bsz 2, sequence lengths
2048 2048 2048 1536 2048 1792, AdamW. Table + JSON + PNG under benchmarks/results/.
"""
import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slothai  # noqa: E402
from slothai import qlora  # noqa: E402

SEQS = [2048, 2048, 2048, 1536, 2048, 1792]


def run(label, path, batch_list, patch, mode):
    torch._dynamo.reset()
    model = qlora.build(path=path, device="cuda", dtype=torch.bfloat16, lora_r=32)
    if patch:
        slothai.patch(model)
    if mode == "full":
        model.config.use_cache = False
        model.compile(dynamic=None)
    elif mode == "regional":
        slothai.compile(model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with slothai.compile_report() as rep:
        steps = qlora.train(model, batch_list, log=lambda s: print(f"  [{label}]{s}", flush=True))
    rec = dict(label=label, losses=[s[0] for s in steps], step_s=[s[1] for s in steps],
               steady_step_s=statistics.median(s[1] for s in steps[1:]),
               peak_gb=torch.cuda.max_memory_allocated() / 1e9, model_gb=base / 1e9, compile=rep.to_dict())
    print(f"[{label}] {rep}\n[{label}] steady {rec['steady_step_s']:.3f} s/step, peak {rec['peak_gb']:.1f} GB", flush=True)
    del model
    torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=SEQS)
    ap.add_argument("--full", action="store_true", help="also time torch.compile(model) (slow to compile)")
    args = ap.parse_args()
    env = common.environment()
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(qlora.make_config(args.model), dtype=torch.bfloat16).save_pretrained(path)
        vocab = qlora.make_config(args.model).vocab_size
        batch_list = list(qlora.batches(vocab, args.batch, args.seq, len(args.seq), "cuda"))
        plans = [("eager", False, "none"), ("slothai", True, "regional")]
        if args.full:
            plans.append(("torch.compile", False, "full"))
        recs = [run(label, path, batch_list, patch, mode) for label, patch, mode in plans]
    eager = recs[0]
    rows = []
    for r in recs:
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], eager["losses"]))
        r["max_rel_loss_diff_vs_eager"] = rel
        c = r["compile"]
        rows.append([r["label"], f"{r['steady_step_s']:.3f}", f"{eager['steady_step_s'] / r['steady_step_s']:.2f}x",
                     f"{r['peak_gb']:.1f}", f"{r['peak_gb'] / eager['peak_gb']:.2f}", f"{rel:.1e}",
                     str(sum(b["count"] for b in c["graph_breaks"])), str(c["compilations"]),
                     f"{c['compile_seconds']:.0f}"])
    lines = [f"QLoRA step, {args.model} shape, NF4 double-quant, bf16, LoRA r=32 on 7 projections, bsz {args.batch}, "
             f"seq {args.seq}, AdamW. {env['card']}, torch {env['torch']}, {env['date']}"]
    lines += common.table(["run", "steady s/step", "speedup", "peak GB", "vs eager", "max rel loss diff",
                           "graph breaks", "compilations", "compile s"], rows)
    common.write(f"qlora_{args.model}", dict(env, model=args.model, batch=args.batch, seq=args.seq, runs=recs), lines)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in recs:
            ax.plot(range(2, len(r["step_s"]) + 1), r["step_s"][1:], "o-", label=r["label"])
        ax.set_xlabel("step (the first, which compiles, left out)")
        ax.set_ylabel("seconds")
        ax.set_title(f"QLoRA {args.model}, {env['card']}, {env['date']}", fontsize=9)
        ax.legend()
        for folder in filter(None, [common.RESULTS, os.environ.get("OUT")]):
            fig.savefig(os.path.join(folder, f"qlora_{args.model}.png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
