"""A QLoRA training step, end to end: HF + PEFT + bitsandbytes eager vs slothai
(patch + regional compile) [vs torch.compile(model) with --full], same batches.

    python benchmarks/bench_qlora.py [--model llama-1b] [--full] [--runs eager slothai full] [--name SUFFIX]

Llama-3.2-1B shape (random weights, tied 128256 vocab), NF4 double-quant, bf16
compute, LoRA r=32 alpha=64 on all 7 projections, bsz 2, sequence lengths
2048 2048 2048 1536 2048 1792, AdamW. Table + JSON + PNG under benchmarks/results/.
"""
import argparse
import gc
import os
import statistics
import sys
import tempfile

import torch
from torch._dynamo.utils import compilation_time_metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slothai  # noqa: E402
from slothai import qlora  # noqa: E402

SEQS = [2048, 2048, 2048, 1536, 2048, 1792]


# GPU kernels by kind, for --profile: first matching pattern wins.
KERNEL_KINDS = [("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas")), ("attention", ("flash", "fmha", "attn")),
                ("nf4 dequant", ("nf4",)), ("fused CE rows", ("ce_rows", "slothai")),
                ("optimizer", ("adam", "multi_tensor")), ("inductor (triton)", ("triton",))]


def profile_step(model, batch):
    """Two more steps, the second under torch.profiler: its wall time, the GPU's
    kernel time, and that time by kind and by kernel."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])

    def start_once(_):
        if prof.profiler is None:
            prof.start()

    (_, _, _), (_, wall, _) = qlora.train(model, [batch, batch], log=start_once)
    prof.stop()
    kinds, top = {}, {}
    for e in prof.key_averages():
        # Kernels only: CPU ops repeat their kernels' time, and a record_function region
        # (AdamW's "Optimizer.step#AdamW.step") shows up as a GPU span over its kernels.
        if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        ms = e.self_device_time_total / 1e3
        name = e.key.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in name for p in pats)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        top[e.key[:60]] = ms
    gpu_ms = sum(kinds.values())
    return dict(wall_ms=round(wall * 1e3, 1), gpu_kernel_ms=round(gpu_ms, 1),
                gpu_busy=round(gpu_ms / (wall * 1e3), 2),
                by_kind_ms=dict(sorted(((k, round(v, 1)) for k, v in kinds.items()), key=lambda kv: -kv[1])),
                top_kernels_ms=dict(sorted(((k, round(v, 1)) for k, v in top.items()), key=lambda kv: -kv[1])[:8]))


def run(label, patch, mode, *, path, batch_list, profile=False):
    torch._dynamo.reset()
    model = qlora.build(path=path, device="cuda", dtype=torch.bfloat16, lora_r=32)
    if patch:
        slothai.patch(model)
    if mode == "full":
        model.config.use_cache = False
        model.compile(dynamic=None)
    elif mode == "regional":
        slothai.compile(model)
    gc.collect()  # the previous run's model sits in reference cycles: free it before measuring
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    before = {k: sum(v) for k, v in compilation_time_metrics.items()}
    with slothai.compile_report() as rep:
        steps = qlora.train(model, batch_list, log=lambda s: print(f"  [{label}]{s}", flush=True))
    # Where compiling went: the 12 largest of torch's own phase timers (nested, so they overlap).
    phases = {k: sum(v) - before.get(k, 0.0) for k, v in compilation_time_metrics.items()}
    phases = dict(sorted(((k, round(v, 2)) for k, v in phases.items() if v > 0.05), key=lambda kv: -kv[1])[:12])
    rec = dict(label=label, losses=[s[0] for s in steps], step_s=[s[1] for s in steps],
               steady_step_s=statistics.median(s[1] for s in steps[1:]),
               peak_gb=torch.cuda.max_memory_allocated() / 1e9, model_gb=base / 1e9, compile=rep.to_dict(),
               compile_phases_s=phases)
    print(f"[{label}] {rep}\n[{label}] steady {rec['steady_step_s']:.3f} s/step, peak {rec['peak_gb']:.1f} GB",
          flush=True)
    if phases:
        print(f"[{label}] compile phases (s): {phases}", flush=True)
    if profile:
        rec["profile"] = profile_step(model, batch_list[0])
        print(f"[{label}] profiled step: {rec['profile']}", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=SEQS)
    ap.add_argument("--full", action="store_true", help="also time torch.compile(model) (slow to compile)")
    ap.add_argument("--runs", nargs="+", choices=["eager", "slothai", "full"], default=["eager", "slothai"],
                    help="which runs (the first is the reference for speedup and loss)")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("--profile", action="store_true",
                    help="after the steps, profile one more: GPU kernel time by kind against wall time")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the sequence lengths this many times; the last pass gives 'settled s/step', "
                         "once every compile and first-call autotune is behind")
    args = ap.parse_args()
    if args.full and "full" not in args.runs:
        args.runs.append("full")
    env = common.environment()
    # Compile times are cold: a fresh inductor/Triton cache for this process, not one
    # left on the machine by an earlier run.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="slothai-bench-inductor-")
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(qlora.make_config(args.model), dtype=torch.bfloat16).save_pretrained(path)
        vocab = qlora.make_config(args.model).vocab_size
        seqs = args.seq * args.repeat
        batch_list = list(qlora.batches(vocab, args.batch, seqs, len(seqs), "cuda"))
        plans = {"eager": ("eager", False, "none"), "slothai": ("slothai", True, "regional"),
                 "full": ("torch.compile", False, "full")}
        recs = [run(*plans[r], path=path, batch_list=batch_list, profile=args.profile) for r in args.runs]
    for r in recs:
        r["settled_step_s"] = statistics.median(r["step_s"][-len(args.seq):]) if args.repeat > 1 else None
    ref = recs[0]  # speedup, memory and loss differences are against the first run
    rows = []
    for r in recs:
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
        r[f"max_rel_loss_diff_vs_{ref['label']}"] = rel
        c = r["compile"]
        settled = f"{r['settled_step_s']:.3f}" if r["settled_step_s"] else "-"
        speedup = f"{ref['steady_step_s'] / r['steady_step_s']:.2f}x"
        rows.append([r["label"], f"{r['steady_step_s']:.3f}", speedup, settled,
                     f"{r['peak_gb']:.1f}", f"{r['peak_gb'] / ref['peak_gb']:.2f}", f"{rel:.1e}",
                     str(sum(b["count"] for b in c["graph_breaks"])), str(c["compilations"]),
                     f"{c['compile_seconds']:.0f}"])
    lines = [f"QLoRA step, {args.model} shape, NF4 double-quant, bf16, LoRA r=32 on 7 projections, bsz {args.batch}, "
             f"seq {args.seq} x {args.repeat}, AdamW. {env['card']}, torch {env['torch']}, {env['date']}"]
    lines += common.table(["run", "steady s/step", f"speedup vs {ref['label']}", "settled s/step", "peak GB",
                           f"vs {ref['label']}", "max rel loss diff", "graph breaks", "compilations", "compile s"],
                          rows)
    name = f"qlora_{args.model}{args.name}"
    common.write(name, dict(env, model=args.model, batch=args.batch, seq=args.seq, repeat=args.repeat, runs=recs),
                 lines)
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
            fig.savefig(os.path.join(folder, f"{name}.png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
