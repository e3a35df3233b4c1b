"""TRL's trainers on a GPU, as TRL runs them and with slothai, each run in its own process
on the same checkpoint, data and seed:

    python benchmarks/bench_trl.py [--trainers sft grpo] [--runs trl slothai slothai-nogc] [--steps 16]

Llama-3.2-1B shape (random weights; texts of random words "t<id>", one token each through
a word-level tokenizer built here), NF4 double-quant, bf16, PEFT LoRA r=32 alpha=64 on all 7
projections (`task_type="CAUSAL_LM"`), TRL 1.15 with its defaults but where named below.

  SFT   SFTTrainer, packing=True (best-fit, padding-free rows), max_length 2048, 2 rows a
        step (~4096 tokens), lr 1e-4 constant; texts of 200-1500 random tokens.
  GRPO  GRPOTrainer, 8 completions a step (2 prompts x 4 generations) of up to 64 tokens from
        64-token prompts, beta 0.04 (a reference pass with the adapter disabled), a reward
        that needs no model (the share of even token ids), lr 1e-5.

Runs: `trl` (PEFT + bitsandbytes as TRL uses them, TRL's own fused LM head), `slothai`
(`slothai.compile(slothai.patch(model))`, then the same trainer; TRL's head is kept, see
slothai/trl.py), `slothai-nogc` (the same with gradient_checkpointing=False: slothai.compile's
activation budget instead of TRL's default checkpointing). Each step is timed between TRL's
step callbacks (CUDA synchronised); memory is the allocator's peak over the run.
Table + JSON + PNG: benchmarks/results/trl_<model>.*
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {
    "trl": "PEFT + bitsandbytes, TRL's fused LM head (TRL as shipped)",
    "slothai": "slothai.compile(slothai.patch(model)), then the trainer",
    "slothai-nogc": "as slothai, with gradient_checkpointing=False",
}


SPECIALS = ("<unk>", "<pad>", "<eos>", "<bos>")  # ids 0..3; not "t0".."t3": transformers finds special
# tokens inside words, so "t120" became "t1" + "20" (unk) with those (as in the 2026-11-26 GPU run)


def _words(vocab, n, g):
    import torch
    return " ".join(f"t{int(i)}" for i in torch.randint(len(SPECIALS), vocab, (n,), generator=g))


def _even_share(completions, **kwargs):
    """Reward: the share of a completion's tokens with an even id (random weights: varied)."""
    out = []
    for c in completions:
        ids = [int(w[1:]) for w in c.split() if w[1:].isdigit()]
        out.append(sum(i % 2 == 0 for i in ids) / max(1, len(ids)))
    return out


def _tokenizer(vocab):
    """Word-level over whitespace: "t<i>" is token i for i >= 4, SPECIALS are 0..3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(SPECIALS)}
    words.update({f"t{i}": i for i in range(len(SPECIALS), vocab)})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>")
    want = [4, vocab // 3, vocab - 1]  # one digit, several, the most: each word one id
    got = tok(" ".join(f"t{i}" for i in want), add_special_tokens=False)["input_ids"]
    assert got == want, f"the tokenizer splits words wrongly: {got}, not {want}"
    return tok


def worker(args):
    import datasets
    import torch
    import trl
    from transformers import AutoConfig, TrainerCallback

    import slothai
    from slothai import qlora

    tok = _tokenizer(AutoConfig.from_pretrained(args.path).vocab_size)
    cuda = torch.cuda.is_available()  # the CPU only for a smoke test (--model tiny)
    model = qlora.build(path=args.path, device="cuda" if cuda else "cpu",
                        dtype=torch.bfloat16 if cuda else torch.float32, lora_r=32)
    if args.run.startswith("slothai"):
        slothai.compile(slothai.patch(model))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    common = dict(output_dir=tempfile.mkdtemp(prefix="slothai-bench-trl-"), max_steps=args.steps, bf16=cuda,
                  use_cpu=not cuda,
                  report_to=[], logging_steps=1, save_strategy="no", seed=0, lr_scheduler_type="constant",
                  disable_tqdm=True)
    if args.run == "slothai-nogc":
        common["gradient_checkpointing"] = False
    if args.trainer == "sft":
        lengths = torch.randint(200, 1500, (args.steps * 8,), generator=g)
        data = datasets.Dataset.from_dict({"text": [_words(vocab, int(n), g) for n in lengths]})
        trainer = trl.SFTTrainer(model=model, train_dataset=data, processing_class=tok, args=trl.SFTConfig(
            **common, packing=True, max_length=2048, per_device_train_batch_size=2, learning_rate=1e-4))
    else:
        data = datasets.Dataset.from_dict({"prompt": [_words(vocab, 64, g) for _ in range(args.steps * 2)]})
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_even_share, train_dataset=data, processing_class=tok,
                                  args=trl.GRPOConfig(**common, per_device_train_batch_size=8, num_generations=4,
                                                      max_completion_length=64, beta=0.04, learning_rate=1e-5))
    times, peaks = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]
            peaks.append(torch.cuda.max_memory_allocated() / 1e9 if cuda else qlora.peak_memory_gb("cpu"))
            print(f"  [{args.trainer} {args.run}] step {len(times)} {times[-1]:.3f} s, peak {peaks[-1]:.2f} GB",
                  flush=True)

    trainer.add_callback(StepTimer())
    torch.manual_seed(0)
    with slothai.compile_report() as report:
        trainer.train()
    logs = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history
            if "loss" in h]
    rec = dict(trainer=args.trainer, run=args.run, what=RUNS[args.run], step_s=times, step_peak_gb=peaks,
               steady_step_s=statistics.median(times[2:]), peak_gb=max(peaks), logs=logs, compile=report.to_dict(),
               gradient_checkpointing=trainer.args.gradient_checkpointing, trl=trl.__version__)
    print(f"[{args.trainer} {args.run}] {report}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rec, f)


def report(recs, failed, args, env):
    import common
    rows = []
    for r in recs:
        ref = next((x for x in recs if x["trainer"] == r["trainer"] and x["run"] == "trl"), None)
        key = "loss"
        diff = "-"
        if ref is not None and r["trainer"] == "sft":  # GRPO samples: the completions differ once logits do
            diff = f"{max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(r['logs'], ref['logs'])):.1e}"
        speed = f"{ref['steady_step_s'] / r['steady_step_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_gb'] / ref['peak_gb']:.2f}" if ref else "-"
        c = r["compile"]
        last = r["logs"][-1] if r["logs"] else {}
        metric = ("mean_token_accuracy" if r["trainer"] == "sft" else "reward")
        rows.append([r["trainer"], r["run"], str(r["gradient_checkpointing"]), f"{r['steady_step_s']:.3f}", speed,
                     f"{r['step_s'][0]:.1f}", f"{r['peak_gb']:.2f}", mem, diff,
                     f"{last.get('loss', float('nan')):.4f}", f"{metric} {last.get(metric, float('nan')):.3f}",
                     f"{sum(b['count'] for b in c['graph_breaks'])}/{c['compilations']}"])
    for name, why in failed.items():
        rows.append(list(name) + [why] + ["-"] * 9)
    lines = [f"TRL {recs[0]['trl'] if recs else '?'} trainers, {args.model} shape, NF4 double-quant, bf16, LoRA r=32 on "
             f"7 projections, {args.steps} steps (median of steps 3..). {env['card']}, torch {env['torch']}, "
             f"{env['date']}"]
    lines += common.table(["trainer", "run", "grad ckpt", "median s/step", "speed vs trl", "step 1 s", "peak GB",
                           "vs trl", "max rel loss diff", "last loss", "last metric", "breaks/compiles"], rows)
    lines += [f"  {k}: {v}" for k, v in RUNS.items()]
    name = f"trl_{args.model}{args.name}"
    common.write(name, dict(env, model=args.model, steps=args.steps, runs=recs, failed={" ".join(k): v for k, v in
                                                                                          failed.items()}), lines)
    fig, axes = common.subplots(1, 2, size=(10, 3.4))
    for r in recs:
        ax = axes[0 if r["trainer"] == "sft" else 1]
        ax.plot(range(2, len(r["step_s"]) + 1), r["step_s"][1:], "o-", markersize=3,
                label=f"{r['run']} ({r['peak_gb']:.1f} GB)")
    for ax, t in zip(axes, ("SFT", "GRPO")):
        ax.set_title(t, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("step (the first, which compiles, left out)")
        ax.set_ylabel("seconds (log)")
        ax.legend(fontsize=7)
    common.save_figure(fig, name, f"TRL on {args.model}, {env['card']}, torch {env['torch']}, {env['date']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--trainers", nargs="+", choices=["sft", "grpo"], default=["sft", "grpo"])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--checkpoint", help="folder to keep the random-weight checkpoint in and reuse")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--trainer", "--run", "--path", "--out"):  # what the parent hands each worker
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, HERE)
    import common
    from bench_qlora import checkpoint_path
    recs, failed, env = [], {}, common.environment()
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_path(args.model, args.checkpoint or tmp)
        for trainer in args.trainers:
            for run in args.runs:
                if trainer == "grpo" and run == "slothai-nogc":
                    continue  # GRPO's step is generation-bound: one slothai run says enough
                out = os.path.join(tmp, f"{trainer}-{run}.json")
                rec, why = common.run_worker(
                    __file__, ["--worker", "--trainer", trainer, "--run", run, "--path", path, "--out", out,
                               "--model", args.model, "--steps", str(args.steps)], out, args.timeout,
                    f"{trainer} {run}")
                if rec is not None:
                    recs.append(rec)
                else:
                    failed[(trainer, run)] = why
                report(recs, failed, args, env)


if __name__ == "__main__":
    main()
