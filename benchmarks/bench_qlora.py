"""A QLoRA training step, end to end, each run in its own process on the same checkpoint
and batches: HF + PEFT + bitsandbytes eager, slothai (patch + compile), slothai's
low-memory mode, the real Unsloth (gradient checkpointing off, and its offloaded
checkpointing), torch.compile(model).

    python benchmarks/bench_qlora.py [--model llama-1b] [--runs eager slothai unsloth ...] [--repeat 2] [--name SUFFIX]

Llama-3.2-1B shape (random weights, tied 128256 vocab), NF4 double-quant, bf16
compute, LoRA r=32 alpha=64 dropout 0 on all 7 projections, bsz 2, sequence lengths
2048 2048 2048 1536 2048 1792, AdamW lr 1e-3. Table + JSON + PNG under benchmarks/results/.
The Unsloth runs need `unsloth` importable (docs/measurements.md, "Reproduce") and are
skipped, with a note in the table, where it is not.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SEQS = [2048, 2048, 2048, 1536, 2048, 1792]

# slothai runs: label -> the keyword arguments of slothai.compile (after slothai.patch).
SLOTHAI_RUNS = {
    "slothai": {},
    "slothai-fp32": dict(adapters="float32", saves=None, cudagraphs=False),
    "slothai-nocg": dict(cudagraphs=False),
    "slothai-nobucket": dict(bucket_lengths=False),
    "slothai-saveall": dict(saves=None),
    "slothai-matmuls": dict(saves="matmuls"),
    "slothai-offload": dict(saves="offload"),
    "slothai-b06": dict(saves=None, memory_budget=0.6),
    "slothai-b07": dict(saves=None, memory_budget=0.7),
    "slothai-lowmem": dict(low_memory=True),
    "slothai-lowmem-nocg": dict(low_memory=True, cudagraphs=False),
    "slothai-warm": {},  # compile's defaults, then warm_up before the first step (worker)
    "slothai-apart": {},  # patch(lora=False): PEFT's LoRA forward, its term added apart (PATCH_KWARGS)
}
# slothai runs whose slothai.patch takes arguments: label -> those.
PATCH_KWARGS = {"slothai-apart": dict(lora=False)}


def _compile_call(kwargs):
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"slothai.patch + slothai.compile({args})" if args else \
        "slothai.patch + slothai.compile (defaults: CUDA graphs, bucketed lengths)"


# label -> what the worker builds. The first run given is the reference for speed and loss.
RUNS = {
    "eager": "HF + PEFT + bitsandbytes, eager",
    **{label: _compile_call(kwargs) for label, kwargs in SLOTHAI_RUNS.items()},
    "slothai-warm": "slothai.patch + slothai.compile, then slothai.warm_up(model, lengths, batch_size) before "
                    "the first step (set-up s: its time, compiling included)",
    "slothai-apart": "slothai.patch(lora=False) + slothai.compile: the LoRA term apart from the base "
                     "layer's op (PEFT's LoRA forward, as before 2026-11-27)",
    "unsloth": "Unsloth FastLanguageModel, use_gradient_checkpointing=False",
    "unsloth-offload": "Unsloth FastLanguageModel, use_gradient_checkpointing='unsloth'",
    "unsloth+slothai": "Unsloth FastLanguageModel (checkpointing off), then slothai.patch",
    "full": "torch.compile(model) on HF + PEFT + bitsandbytes",
}

# GPU kernels by kind, for --profile: first matching pattern wins.
KERNEL_KINDS = [("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas")), ("attention", ("flash", "fmha", "attn")),
                ("nf4 dequant", ("nf4",)), ("fused CE rows", ("ce_rows", "slothai")),
                ("optimizer", ("adam", "multi_tensor")), ("inductor (triton)", ("triton",))]


# ---------------------------------------------------------------------------
# Worker: one run, in this process.

def build_model(label, path, args):
    import torch

    if label.startswith("unsloth"):
        from unsloth import FastLanguageModel  # before transformers/peft: Unsloth patches them at import

        from slothai import qlora
        # max_seq_length past the config's max_position_embeddings makes Unsloth scale RoPE:
        # another model than ours. The longest length of the run, then.
        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=max(args.seq), dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(
            model, r=32, lora_alpha=64, lora_dropout=0.0, bias="none", target_modules=qlora.PROJECTIONS,
            use_gradient_checkpointing="unsloth" if label == "unsloth-offload" else False, random_state=1)
        if label == "unsloth+slothai":
            import slothai
            slothai.patch(model)
        return model
    import slothai
    from slothai import qlora
    model = qlora.build(path=path, device="cuda", dtype=torch.bfloat16, lora_r=32)
    if label == "full":
        model.config.use_cache = False
        model.compile(dynamic=None)
    elif label in SLOTHAI_RUNS:
        slothai.patch(model, **PATCH_KWARGS.get(label, {}))
        slothai.compile(model, **SLOTHAI_RUNS[label])
    return model


def profile_step(model, batch):
    """Two more steps, the second under torch.profiler: its wall time, the GPU's
    kernel time, and that time by kind and by kernel."""
    import common
    import torch

    from slothai import qlora
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])

    def start_once(_):
        if prof.profiler is None:
            prof.start()

    (_, _, _), (_, wall, _) = qlora.train(model, [batch, batch], log=start_once)
    prof.stop()
    kinds, top = common.kernel_times(prof, KERNEL_KINDS)
    top = {k: ms for k, (_, ms) in top.items()}
    gpu_ms = sum(kinds.values())
    return dict(wall_ms=round(wall * 1e3, 1), gpu_kernel_ms=round(gpu_ms, 1),
                gpu_busy=round(gpu_ms / (wall * 1e3), 2),
                by_kind_ms=dict(sorted(((k, round(v, 1)) for k, v in kinds.items()), key=lambda kv: -kv[1])),
                top_kernels_ms=dict(sorted(((k, round(v, 1)) for k, v in top.items()), key=lambda kv: -kv[1])[:20]))


def phase_peaks(model, batch):
    """Peak memory of the forward (with the loss head) and the backward of one more
    step, and what stays allocated after it: where a step's peak comes from. Under
    CUDA graphs a replay allocates nothing (its memory was taken when the graph was
    recorded), so for those runs only the per-step peaks say anything."""
    import torch

    from slothai import qlora
    peaks = {}
    torch.cuda.reset_peak_memory_stats()
    loss = model(**qlora.model_inputs(batch)).loss
    peaks["forward"] = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    peaks["backward"] = torch.cuda.max_memory_allocated() / 1e9
    model.zero_grad(set_to_none=True)
    peaks["after"] = torch.cuda.memory_allocated() / 1e9
    return {k: round(v, 3) for k, v in peaks.items()}


def worker(args):
    label = args.worker
    model = build_model(label, args.path, args)  # Unsloth first: it must import before transformers
    import gc

    import torch
    from torch._dynamo.utils import compilation_time_metrics

    import slothai
    from slothai import qlora
    vocab = model.config.vocab_size
    seqs = args.seq * args.repeat
    batch_list = list(qlora.batches(vocab, args.batch, seqs, len(seqs), "cuda", padded=args.padded))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step_peaks = []

    def log(line):  # after each step: its own peak, so a compile-time peak in step 1 shows apart
        step_peaks.append(torch.cuda.max_memory_allocated() / 1e9)
        torch.cuda.reset_peak_memory_stats()
        print(f"  [{label}]{line}  peak {step_peaks[-1]:.2f} GB", flush=True)

    with slothai.compile_report() as rep:
        warm = slothai.warm_up(model, args.seq, batch_size=args.batch, padded=args.padded > 0) \
            if label == "slothai-warm" else {}
        steps = qlora.train(model, batch_list, log=log)
    phases = {k: round(sum(v), 2) for k, v in compilation_time_metrics.items() if sum(v) > 0.05}
    phases = dict(sorted(phases.items(), key=lambda kv: -kv[1])[:12])
    rec = dict(label=label, what=RUNS[label], losses=[s[0] for s in steps], step_s=[s[1] for s in steps],
               seqs=seqs, steady_step_s=statistics.median(s[1] for s in steps[1:]),
               peak_gb=max(step_peaks), step_peak_gb=step_peaks, model_gb=base / 1e9, compile=rep.to_dict(),
               compile_phases_s=phases, warm_up_s=warm)
    print(f"[{label}] {rep}\n[{label}] steady {rec['steady_step_s']:.3f} s/step, peak {rec['peak_gb']:.2f} GB",
          flush=True)
    rec["phase_peak_gb"] = phase_peaks(model, batch_list[0])
    print(f"[{label}] one more step, peak GB by phase: {rec['phase_peak_gb']}", flush=True)
    if args.profile:
        rec["profile"] = profile_step(model, batch_list[0])
        print(f"[{label}] profiled step: {rec['profile']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rec, f)


# ---------------------------------------------------------------------------
# Parent: the checkpoint, one process per run, the table and plot.

def save_checkpoint(model_name, path):
    """Random weights in bf16 plus a word-level tokenizer (Unsloth's loader wants one)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from slothai import qlora
    config = qlora.make_config(model_name)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # an 8B random init takes minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3")
    tok.save_pretrained(path)


def checkpoint_path(model_name, path):
    """`path`, holding the random-weight checkpoint: made there unless it already is."""
    if not os.path.exists(os.path.join(path, "config.json")):
        save_checkpoint(model_name, path)
    return path


def first_at_new_length(rec):
    """Seconds of the slowest first step at a length not seen before (step 0 aside)."""
    seen, worst = {rec["seqs"][0]}, None
    for s, t in zip(rec["seqs"][1:], rec["step_s"][1:]):
        if s not in seen:
            seen.add(s)
            worst = t if worst is None else max(worst, t)
    return worst


def plot(recs, name, title):
    import common
    fig, (a1, a2) = common.subplots(2)
    for r in recs:
        a1.plot(range(2, len(r["step_s"]) + 1), r["step_s"][1:], "o-", label=r["label"], markersize=3)
        a2.barh(r["label"], r["peak_gb"])
    a1.set_yscale("log")
    a1.set_xlabel("step (the first, which compiles, left out; log scale)")
    a1.set_ylabel("seconds")
    a1.legend(fontsize=7)
    a2.set_xlabel("peak GPU memory, GB")
    common.save_figure(fig, name, title)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=SEQS)
    ap.add_argument("--padded", type=int, default=0,
                    help="batches as a padding collator makes them: the last row this many tokens shorter "
                         "(attention mask 0, labels -100)")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=["eager", "slothai", "unsloth"],
                    help="which runs (the first is the reference for speedup and loss)")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("--profile", action="store_true",
                    help="after the steps, profile one more: GPU kernel time by kind against wall time")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the sequence lengths this many times; the last pass gives 'settled s/step', "
                         "once every compile and first-call autotune is behind")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--checkpoint", help="folder to keep the random-weight checkpoint in and reuse")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, HERE)
    import common
    env = common.environment()
    recs, failed = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_path(args.model, args.checkpoint or tmp)
        for label in args.runs:
            out = os.path.join(tmp, f"{label}.json")
            rec, why = common.run_worker(
                __file__, ["--worker", label, "--path", path, "--out", out, "--model", args.model, "--batch",
                           str(args.batch), "--repeat", str(args.repeat), "--padded", str(args.padded),
                           "--seq", *map(str, args.seq)]
                + (["--profile"] if args.profile else []), out, args.timeout, label,
                UNSLOTH_COMPILE_LOCATION=tempfile.mkdtemp(prefix="unsloth-compiled-"))
            if rec is not None:
                recs.append(rec)
            else:
                failed[label] = why
            if recs:  # after every run, so a call cut short still leaves its results
                report(args, env, recs, failed)


def report(args, env, recs, failed):
    import common
    n_last = len(args.seq)
    for r in recs:
        r["settled_step_s"] = statistics.median(r["step_s"][-n_last:]) if args.repeat > 1 else None
        r["first_new_length_s"] = first_at_new_length(r)
    ref = recs[0]  # speedup, memory and loss differences are against the first run
    # and, where eager ran but is not the first, the loss differences against eager's too
    loss_refs = [ref] + [r for r in recs if r["label"] == "eager" and r is not ref]
    rows = []
    for r in recs:
        rels = []
        for base in loss_refs:
            rels.append(max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])))
            r[f"max_rel_loss_diff_vs_{base['label']}"] = rels[-1]
        c = r["compile"]
        steady = r["settled_step_s"] or r["steady_step_s"]
        new_len = f"{r['first_new_length_s'] / steady:.2f}x" if r["first_new_length_s"] else "-"
        rows.append([r["label"], f"{r['steady_step_s']:.3f}", f"{r['settled_step_s']:.3f}" if r["settled_step_s"]
                     else "-", f"{(ref['settled_step_s'] or ref['steady_step_s']) / steady:.2f}x",
                     new_len, f"{r['peak_gb']:.2f}", f"{r['peak_gb'] / ref['peak_gb']:.2f}",
                     *(f"{rel:.1e}" for rel in rels),
                     f"{sum(r['step_s'][1:]):.2f}", str(sum(b["count"] for b in c["graph_breaks"])),
                     str(c["compilations"]),
                     f"{c['compile_seconds']:.0f}", f"{sum(r.get('warm_up_s', {}).values()):.1f}"])
    for label, why in failed.items():
        rows.append([label, why] + ["-"] * (10 + len(loss_refs)))
    padded = f", last row {args.padded} tokens of padding (attention mask)" if args.padded else ""
    lines = [f"QLoRA step, {args.model} shape, NF4 double-quant, bf16, LoRA r=32 on 7 projections, bsz {args.batch}, "
             f"seq {args.seq} x {args.repeat}{padded}, AdamW. {env['card']}, torch {env['torch']}, {env['date']}"]
    lines += common.table(["run", "median s/step", "settled s/step", f"speed vs {ref['label']}",
                           "first new length", "peak GB", f"vs {ref['label']}",
                           *(f"max rel loss diff vs {b['label']}" for b in loss_refs),
                           "steps 2+ s", "graph breaks", "compilations", "compile s", "set-up s"], rows)
    lines += [f"  {r['label']}: {r['what']}" for r in recs]
    name = f"qlora_{args.model}{args.name}"
    common.write(name, dict(env, model=args.model, batch=args.batch, seq=args.seq, repeat=args.repeat,
                            padded=args.padded, runs=recs,
                            failed=failed), lines)
    plot(recs, name, f"QLoRA {args.model}, bsz {args.batch}, {env['card']}, torch {env['torch']}, {env['date']}")



if __name__ == "__main__":
    main()
