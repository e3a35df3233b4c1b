"""Decoding speed of a QLoRA model with its LoRA adapter active: slothai's generate()
against transformers + PEFT + bitsandbytes as users run it and the real Unsloth
(`FastLanguageModel.for_inference`), each run in its own process on one random-weight
checkpoint, against the byte ceiling of the card.

    python benchmarks/bench_decode.py [--model llama-1b llama-8b] [--runs slothai transformers unsloth]
                                      [--batch 1 8] [--prompt 128] [--new 512]
    python benchmarks/bench_decode.py --tiny          # CPU smoke test (tiny model, no result files)

Each model: NF4 double-quant, bf16 compute, PEFT LoRA r=32 alpha=64 on all 7 projections
(Unsloth: its own get_peft_model with the same), greedy, a `--prompt`-token random prompt
per row, exactly `--new` new tokens (no EOS). A row of the table is one (run, batch):
the first call (slothai: compiling and recording its CUDA graph), then the median of
`--reps` calls, timed to the device's end. tokens/s counts new tokens of every row;
"decode tokens/s" leaves the prefill out (a call of 1 new token subtracted).

The ceiling: a decode step reads every weight once — the 4-bit layers' codes and scales,
the bf16 LM head (and the LoRA weights, norms) — plus each row's KV cache (the prompt and,
on average, half the new tokens); at the card's copy bandwidth (benchmarks/common.py,
bytes read + written) that gives tokens/s = batch x bandwidth / bytes per step.

Results: benchmarks/results/decode_<model><--name>.{json,txt,png}: "runs" of {run,
batch, new_tokens, tokens_per_s, decode_tokens_per_s, first_call_s, peak_gb, ...} and
"ceiling_tokens_per_s" (batch 1; each run also carries its batch's). "tokens = trf's": how many
of a run's first 16 greedy tokens (row 0) transformers' run also chose — on random weights the
logits are near-ties, so rounding differences part the two early; the CUDA tests check the
logits themselves.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {
    "slothai": "slothai.patch(model): slothai's generate (static cache, CUDA-graph decode step, regional compile)",
    "slothai-full": "as slothai, the whole decode step compiled (configure(compile='full'))",
    "slothai-eager": "as slothai, the decode step not compiled, still one CUDA graph (configure(compile=None))",
    "slothai-compiledprefill": "as slothai, the prefill compiled too (configure(compile_prefill=True); the "
                               "default before 2026-12-06, whose files call the eager one slothai-eagerprefill)",
    "slothai-bf16a": "as slothai, the LoRA weights in bf16 (as TRL's trainers cast them on 4-bit models; PEFT's "
                     "default keeps them fp32, which the 4-bit op also takes when no gradient is needed)",
    "transformers": "transformers + PEFT + bitsandbytes generate(), as users run it",
    "unsloth": "Unsloth FastLanguageModel.for_inference(model), then generate()",
}

SLOTHAI_OPTIONS = {"slothai": {}, "slothai-full": dict(compile="full"), "slothai-eager": dict(compile=None),
                   "slothai-compiledprefill": dict(compile_prefill=True), "slothai-bf16a": {}}

# GPU kernels by kind, for --profile: first matching pattern wins.
DECODE_KINDS = [("nf4 product (slothai)", ("nf4",)), ("4-bit (bitsandbytes)", ("kgemm_4bit", "gemv_4bit", "kdequant")),
                ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
                ("attention", ("flash", "fmha", "attn", "sdpa")), ("inductor (triton)", ("triton",)),
                ("copy / fill", ("memcpy", "memset", "copy", "fill"))]


# ---------------------------------------------------------------------------
# Worker: one run, in this process.

def build(run, path, device, dtype):
    if run == "unsloth":
        from unsloth import FastLanguageModel  # before transformers / peft: Unsloth patches them

        from slothai import qlora
        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=4096, dtype=dtype, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, lora_dropout=0.0, bias="none",
                                                 target_modules=qlora.PROJECTIONS, random_state=1)
        FastLanguageModel.for_inference(model)
        return model
    import slothai
    from slothai import qlora
    model = qlora.build(path=path, device=device, dtype=dtype, lora_r=32)
    model.config.use_cache = True  # qlora.build turns it off for training
    if run == "slothai-bf16a":
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    if run.startswith("slothai"):
        slothai.patch(model)
        slothai.generation.configure(model, **SLOTHAI_OPTIONS[run])
    return model


def model_bytes(model):
    """Bytes a decode step reads of the weights: every parameter but the input
    embedding (one row a token), 4-bit ones as stored with their scales; the LM head
    once even when tied to the embedding."""
    import torch
    seen, total = set(), 0
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for p in model.parameters():
        if id(p) in seen or (p is embed and p is not head):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            extra = [qs.absmax, getattr(qs, "code", None)]
            if getattr(qs, "state2", None) is not None:
                extra += [qs.state2.absmax, qs.state2.code]
            total += sum(t.numel() * t.element_size() for t in extra if isinstance(t, torch.Tensor))
    return total


def kv_bytes_per_token(config, dtype_bytes=2):
    heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype_bytes


def profile_decode(call, new):
    """A decode step's profile: a call of `new` new tokens and one of 1, each under
    torch.profiler, their difference over the `new - 1` steps between them — the step's
    wall time, its GPU kernel time by kind, kernels a step and the costliest kernels.
    The profiler adds host time to each op; replayed graphs' kernels are recorded too."""
    import common
    import torch

    seen = []
    for n in (1, new):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            wall, _ = call(n)
        seen.append((wall, *common.kernel_times(prof, DECODE_KINDS)))
    (wall1, kinds1, kernels1), (wall, kinds, kernels) = seen
    steps = new - 1
    by_kind = {k: (ms - kinds1.get(k, 0.0)) * 1e3 / steps for k, ms in kinds.items()}
    top = []
    for name, (calls, ms) in kernels.items():
        calls1, ms1 = kernels1.get(name, (0, 0.0))
        top.append((name, (calls - calls1) / steps, (ms - ms1) * 1e3 / steps))
    step_us = (wall - wall1) * 1e6 / steps
    gpu_us = sum(by_kind.values())
    return dict(new_tokens=new, step_us=round(step_us, 1), gpu_kernel_us=round(gpu_us, 1),
                gpu_busy=round(gpu_us / step_us, 2), kernels_per_step=round(sum(c for _, c, _ in top), 1),
                by_kind_us=dict(sorted(((k, round(v, 1)) for k, v in by_kind.items()), key=lambda kv: -kv[1])),
                top_kernels=[dict(kernel=n, per_step=round(c, 2), us_per_step=round(us, 1))
                             for n, c, us in sorted(top, key=lambda t: -t[2])[:25]])


def compile_seconds():
    """Seconds torch.compile has spent in this process so far (dynamo's own tally, inductor included)."""
    from torch._dynamo.utils import compilation_time_metrics
    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def worker(args):
    run = args.run
    model = build(run, args.path, args.device, args.dtype_obj())  # Unsloth first: before transformers
    import torch

    import slothai
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rec = dict(run=run, what=RUNS[run], model_bytes=model_bytes(model), kv_bytes_per_token=kv_bytes_per_token(
        model.config), rows=[])
    for batch in args.batch:
        ids = torch.randint(4, vocab, (batch, args.prompt), generator=g).to(args.device)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                  pad_token_id=0, use_cache=True)

        def call(new):
            sync()
            t = time.perf_counter()
            out = model.generate(**kw, max_new_tokens=new, min_new_tokens=new)
            sync()
            assert out.shape == (batch, args.prompt + new), out.shape
            return time.perf_counter() - t, out

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        compiled_before = compile_seconds()
        first, out = call(args.new)
        first_compile = compile_seconds() - compiled_before
        times = [call(args.new)[0] for _ in range(args.reps)]
        prefill = statistics.median(call(1)[0] for _ in range(args.reps))
        seconds = statistics.median(times)
        row = dict(run=run, batch=batch, new_tokens=args.new, prompt=args.prompt,
                   tokens_per_s=batch * args.new / seconds,
                   decode_tokens_per_s=batch * (args.new - 1) / max(1e-9, seconds - prefill), seconds=seconds,
                   times=times, prefill_s=prefill, first_call_s=first, first_call_compile_s=first_compile,
                   peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                   head_tokens=out[0, args.prompt:args.prompt + 16].tolist())
        if args.profile:
            row["profile"] = profile_decode(call, args.profile)
            print(f"  [{run}] batch {batch}: profiled step {row['profile']}", flush=True)
        if run.startswith("slothai"):
            row["generation_calls"] = dict(slothai.generation.CALLS)
            row["generation_gb"] = slothai.generation.memory_bytes(model) / 1e9
            slothai.generation.CALLS.clear()
        rec["rows"].append(row)
        print(f"  [{run}] batch {batch}: {row['tokens_per_s']:.0f} tokens/s "
              f"({row['decode_tokens_per_s']:.0f} decoding), "
              f"first call {first:.2f} s ({first_compile:.2f} of it torch.compile), peak {row['peak_gb'] or 0:.2f} GB",
              flush=True)
        if run.startswith("slothai"):
            slothai.generation.release(model)  # each batch's memory its own
    with open(args.out, "w") as f:
        json.dump(rec, f)


# ---------------------------------------------------------------------------
# Parent: checkpoint, one process per run, table, JSON, plot.

def report(args, env, recs, failed, bandwidth):
    import common
    runs, rows = [], []
    ceiling1 = None
    name = f"decode_{args.model}{args.name}"
    path = os.path.join(common.RESULTS, name + ".json")
    kept = []
    if args.merge and os.path.exists(path):  # runs of an earlier call that this one did not run
        with open(path) as f:
            old = json.load(f)
        ran = {r["run"] for r in recs} | set(failed)
        kept = [r for r in old.get("runs", []) if r["run"] not in ran]
        failed = {**{k: v for k, v in old.get("failed", {}).items() if k not in ran}, **failed}
        bandwidth = bandwidth or old.get("bandwidth_gbs")
    for rec in recs:
        for r in rec["rows"]:
            kv = rec["kv_bytes_per_token"] * (r["prompt"] + r["new_tokens"] / 2)
            ceiling = r["batch"] * bandwidth * 1e9 / (rec["model_bytes"] + r["batch"] * kv) if bandwidth else None
            if r["batch"] == 1 and ceiling:
                ceiling1 = ceiling
            runs.append(dict(r, ceiling_tokens_per_s=ceiling, model_bytes=rec["model_bytes"]))
    runs = kept + runs
    ceiling1 = ceiling1 or next((r["ceiling_tokens_per_s"] for r in runs if r["batch"] == 1), None)
    for r in runs:
        def vs(name):
            other = next((x for x in runs if x["run"] == name and x["batch"] == r["batch"]), None)
            return f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other and other is not r else "-"
        of = f"{r['tokens_per_s'] / r['ceiling_tokens_per_s']:.0%}" if r["ceiling_tokens_per_s"] else "-"
        trf = next((x for x in runs if x["run"] == "transformers" and x["batch"] == r["batch"]), None)
        same = "-"
        if trf is not None and trf is not r:  # greedy tokens shared with transformers' (random weights: near-ties)
            same = str(next((i for i, (a, b) in enumerate(zip(r["head_tokens"], trf["head_tokens"])) if a != b),
                            len(r["head_tokens"])))
        rows.append([r["run"], str(r["batch"]), str(r["new_tokens"]), f"{r['tokens_per_s']:.0f}",
                     f"{r['decode_tokens_per_s']:.0f}", f"{r['ceiling_tokens_per_s']:.0f}" if r["ceiling_tokens_per_s"]
                     else "-", of, vs("transformers"), vs("unsloth"), f"{r['first_call_s']:.2f}",
                     f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-", same])
    for run, why in failed.items():
        rows.append([run, "-", "-", why] + ["-"] * 8)
    gb = runs[0]["model_bytes"] / 1e9 if runs else 0
    lines = [f"Decode, {args.model} shape, NF4 double-quant, {args.dtype_name}, LoRA r=32 on 7 projections active, "
             f"greedy, prompt "
             f"{args.prompt}, {args.new} new tokens; {gb:.2f} GB of weights read a step; copy bandwidth "
             f"{bandwidth or 0:.0f} GB/s. {env['card']}, torch {env['torch']}, {env['date']}"]
    lines += common.table(["run", "batch", "new", "tokens/s", "decode tokens/s", "ceiling", "of ceiling", "vs trf",
                           "vs unsloth", "first call s", "peak GB", "tokens = trf's"], rows)
    lines += [f"  {k}: {v}" for k, v in RUNS.items()]
    for r in (r for r in runs if r.get("profile")):
        p = r["profile"]
        lines += [f"profile, {r['run']} batch {r['batch']} (calls of {p['new_tokens']} and 1 new tokens): "
                  f"a decode step {p['step_us']:.0f} µs, GPU kernels {p['gpu_kernel_us']:.0f} µs ({p['gpu_busy']:.0%} busy), "
                  f"{p['kernels_per_step']:.0f} kernels",
                  "  by kind, µs a step: " + ", ".join(f"{k} {v:.1f}" for k, v in p["by_kind_us"].items())]
        lines += [f"  {k['us_per_step']:8.1f} µs {k['per_step']:6.1f}x  {k['kernel']}" for k in p["top_kernels"][:15]]
    common.write(name, dict(env, model=args.model, prompt=args.prompt, new_tokens=args.new, bandwidth_gbs=bandwidth,
                            ceiling_tokens_per_s=ceiling1, runs=runs, failed=failed), lines)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (ax,) = common.subplots(1, 1, size=(7, 3.4))
    batches = sorted({r["batch"] for r in runs})
    names = [n for n in RUNS if any(r["run"] == n for r in runs)]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [b_i + i * width for b_i, b in enumerate(batches) if any(r["run"] == n and r["batch"] == b for r in runs)]
        ys = [next(r["tokens_per_s"] for r in runs if r["run"] == n and r["batch"] == b) for b in batches
              if any(r["run"] == n and r["batch"] == b for r in runs)]
        ax.bar(xs, ys, width, label=n)
    for b_i, b in enumerate(batches):
        c = next((r["ceiling_tokens_per_s"] for r in runs if r["batch"] == b and r["ceiling_tokens_per_s"]), None)
        if c:
            ax.hlines(c, b_i - width / 2, b_i + 0.8 - width / 2, colors="k", linestyles="dashed",  # over its bars
                      label="byte ceiling" if b_i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("new tokens / s (log)")
    ax.legend(fontsize=7)
    common.save_figure(fig, name, f"decode {args.model}, {env['card']}, torch {env['torch']}, {env['date']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["llama-1b", "llama-8b"])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=["slothai", "transformers", "unsloth"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--profile", type=int, nargs="?", const=64, default=0, metavar="NEW",
                    help="also profile a decode step (calls of NEW and 1 new tokens, default 64)")
    ap.add_argument("--checkpoint", help="folder to keep the random-weight checkpoints in and reuse")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("--merge", action="store_true", help="keep the other runs of an existing result file")
    ap.add_argument("--results", help="folder for the result files (default benchmarks/results; --tiny: a temp one)")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke test: tiny model, CPU if no GPU, results in a temp folder")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--run", "--path", "--out", "--device", "--dtype"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch
        args.dtype_obj = lambda: getattr(torch, args.dtype)
        return worker(args)
    sys.path.insert(0, HERE)
    import common
    import torch
    from bench_qlora import checkpoint_path
    cuda = torch.cuda.is_available()
    if args.tiny:
        args.model, args.prompt, args.new, args.reps = ["tiny"], 8, 6, 1
        common.RESULTS = args.results or tempfile.mkdtemp(prefix="slothai-bench-decode-")
        print(f"smoke test: results in {common.RESULTS}")
    elif args.results:
        common.RESULTS = args.results
    env = common.environment()
    bandwidth = common.copy_bandwidth_gbs() if cuda else None
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    for model_name in args.model:
        recs, failed = [], {}
        with tempfile.TemporaryDirectory() as tmp:
            path = checkpoint_path(model_name, os.path.join(args.checkpoint, model_name) if args.checkpoint else
                                   os.path.join(tmp, model_name))
            for run in args.runs:
                if run == "unsloth" and importlib.util.find_spec("unsloth") is None:
                    failed[run] = "unsloth not installed"
                    report(argparse.Namespace(**{**vars(args), "model": model_name, "dtype_name": dtype}), env, recs,
                           failed, bandwidth)
                    continue
                out = os.path.join(tmp, f"{run}.json")
                rec, why = common.run_worker(
                    __file__, ["--worker", "--run", run, "--path", path, "--out", out, "--device", device, "--dtype",
                               dtype, "--prompt", str(args.prompt), "--new", str(args.new), "--reps", str(args.reps),
                               "--profile", str(args.profile),
                               "--batch", *map(str, args.batch)], out, args.timeout, f"{model_name} {run}",
                    UNSLOTH_COMPILE_LOCATION=tempfile.mkdtemp(prefix="unsloth-compiled-"))
                if rec is not None:
                    recs.append(rec)
                else:
                    failed[run] = why
                report(argparse.Namespace(**{**vars(args), "model": model_name, "dtype_name": dtype}), env, recs,
                       failed, bandwidth)


if __name__ == "__main__":
    main()
