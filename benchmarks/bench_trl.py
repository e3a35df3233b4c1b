"""TRL's trainers on a GPU, as TRL runs them, with slothai and with Unsloth, each run in
its own process on the same checkpoint, data and seed:

    python benchmarks/bench_trl.py [--model llama-1b] [--trainers sft grpo] [--runs trl slothai ...] [--steps 16]
    python benchmarks/bench_trl.py --trainers grpo --model llama-8b --steps 6 --runs slothai --merge
    python benchmarks/bench_trl.py --tiny          # CPU smoke test (tiny model, 2 steps, no result files)

Llama-3.2-1B (or --model llama-8b) shape, random weights; texts of random words "t<id>", one
token each through a word-level tokenizer built here; NF4 double-quant, bf16, PEFT LoRA r=32
alpha=64 on all 7 projections (`task_type="CAUSAL_LM"`), TRL 1.15 with its defaults but where
named below.

  SFT   SFTTrainer, packing=True (best-fit, padding-free rows), max_length 2048, 2 rows a
        step (~4096 tokens), lr 1e-4 constant; texts of 200-1500 random tokens.
  GRPO  GRPOTrainer without vLLM (sampling through the PEFT model's generate()),
        --prompts prompts of 64 tokens a step, 8 completions of up to --new-tokens (256)
        tokens each, beta 0.04 (a reference pass with the adapter disabled), a reward that
        needs no model (the share of even token ids), lr 1e-5.

Runs: `trl` (PEFT + bitsandbytes as TRL uses them, TRL's own fused LM head),
`slothai` (`slothai.compile(slothai.patch(model))`, then the same trainer; TRL's head is
kept, see slothai/patching/trl.py; generate() is slothai's), `slothai-nogc` (the same with
gradient_checkpointing=False), `slothai-compiledprefill` (generate()'s prefill compiled too;
the default before 2026-12-06, whose result files call the eager one `slothai-eagerprefill`),
`unsloth` (GRPO: Unsloth's FastLanguageModel, its get_peft_model with
`use_gradient_checkpointing="unsloth"`, fast_inference=False — its non-vLLM path — and
TRL's GRPOTrainer as Unsloth patches it at import). Each step is
timed between TRL's step callbacks (CUDA synchronised); a GRPO step's sampling is the
time inside the model's generate() calls (wrapped, synchronised); memory is the
allocator's peak over the run.

Results: SFT -> benchmarks/results/trl_<model><--name>.*; GRPO ->
benchmarks/results/grpo_<model><--name>.{json,txt,png} with "runs" of {run, s_per_step,
sampling_s, training_s, first_step_s, first_sampling_s, peak_gb, ...} (medians from the
third step on). --merge keeps the runs of an existing result file that this call does
not run (a long 8B comparison in several calls).
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
    "trl": "PEFT + bitsandbytes, TRL's fused LM head (TRL as shipped)",
    "slothai": "slothai.compile(slothai.patch(model)), then the trainer (generate() is slothai's)",
    "slothai-nogc": "as slothai, with gradient_checkpointing=False",
    "slothai-compiledprefill": "as slothai, generate()'s prefill compiled too "
                               "(generation.configure(compile_prefill=True))",
    "unsloth": "Unsloth FastLanguageModel + get_peft_model(use_gradient_checkpointing='unsloth'), TRL as Unsloth "
               "patches it, no vLLM (GRPO only)",
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


def _unsloth_model(args, cuda):
    import torch
    import unsloth  # noqa: F401  (before transformers / trl / peft: Unsloth patches them at import)
    from unsloth import FastLanguageModel

    from slothai import qlora
    if hasattr(unsloth, "PatchFastRL"):  # older releases patch TRL's GRPO when asked
        try:
            unsloth.PatchFastRL("GRPO", FastLanguageModel)
        except Exception as e:  # noqa: BLE001  (newer ones do it at import)
            print(f"  PatchFastRL: {e}", flush=True)
    model, _ = FastLanguageModel.from_pretrained(args.path, max_seq_length=args.prompt + args.new_tokens + 64,
                                                 dtype=torch.bfloat16 if cuda else torch.float32, load_in_4bit=True,
                                                 fast_inference=False)
    return FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, lora_dropout=0.0, bias="none",
                                            target_modules=qlora.PROJECTIONS, use_gradient_checkpointing="unsloth",
                                            random_state=1)


def _timed_generate(model, cuda, sampling):
    """Wrap the PEFT model's generate (what TRL's GRPO calls) to add each call's seconds
    to `sampling[-1]`."""
    import torch
    generate = model.generate

    def timed(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        sampling[-1] += time.perf_counter() - t
        return out

    model.generate = timed


def worker(args):
    import torch
    cuda = torch.cuda.is_available()  # the CPU only for a smoke test (--tiny)
    if args.run == "unsloth":
        model = _unsloth_model(args, cuda)
    import datasets
    import trl
    from transformers import AutoConfig, TrainerCallback

    import slothai
    import slothai.patching.trl
    from slothai import qlora

    tok = _tokenizer(AutoConfig.from_pretrained(args.path).vocab_size)
    if not cuda:  # TRL's fused LM head is Triton: on the CPU (smoke test) slothai's kernel serves every run
        slothai.patching.trl.supply_trl_kernel()
    if args.run != "unsloth":
        model = qlora.build(path=args.path, device="cuda" if cuda else "cpu",
                            dtype=torch.bfloat16 if cuda else torch.float32, lora_r=32)
    if args.run.startswith("slothai"):
        slothai.compile(slothai.patch(model))
    if args.run == "slothai-compiledprefill":
        slothai.generation.configure(model, compile_prefill=True)
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
        data = datasets.Dataset.from_dict({"prompt": [_words(vocab, args.prompt, g)
                                                      for _ in range(args.steps * args.prompts)]})
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_even_share, train_dataset=data, processing_class=tok,
                                  args=trl.GRPOConfig(**common, per_device_train_batch_size=8 * args.prompts,
                                                      num_generations=8, max_completion_length=args.new_tokens,
                                                      beta=0.04, learning_rate=1e-5))
    times, peaks, sampling = [], [], []
    if args.trainer == "grpo":
        _timed_generate(trainer.model, cuda, sampling)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            sampling.append(0.0)
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]
            peaks.append(torch.cuda.max_memory_allocated() / 1e9 if cuda else qlora.peak_memory_gb("cpu"))
            split = f" (sampling {sampling[-1]:.3f} s)" if args.trainer == "grpo" else ""
            print(f"  [{args.trainer} {args.run}] step {len(times)} {times[-1]:.3f} s{split}, peak {peaks[-1]:.2f} GB",
                  flush=True)

    trainer.add_callback(StepTimer())
    torch.manual_seed(0)
    with slothai.compile_report() as report:
        trainer.train()
    logs = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history
            if "loss" in h]
    steady = times[2:] or times[-1:]
    rec = dict(trainer=args.trainer, run=args.run, what=RUNS[args.run], step_s=times, step_peak_gb=peaks,
               steady_step_s=statistics.median(steady), peak_gb=max(peaks), logs=logs, compile=report.to_dict(),
               gradient_checkpointing=trainer.args.gradient_checkpointing, trl=trl.__version__)
    if args.trainer == "grpo":
        rec.update(sampling_step_s=sampling[:len(times)], sampling_s=statistics.median(sampling[2:len(times)] or
                                                                                       sampling[-1:]),
                   first_step_s=times[0], first_sampling_s=sampling[0], generation_calls=dict(slothai.generation.CALLS))
        rec["s_per_step"] = rec["steady_step_s"]
        rec["training_s"] = rec["steady_step_s"] - rec["sampling_s"]
    print(f"[{args.trainer} {args.run}] {report}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rec, f)


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    return True


def report(recs, failed, args, env):
    """SFT runs: trl_<model><name>.*"""
    import common
    recs = [r for r in recs if r["trainer"] == "sft"]
    failed = {k: v for k, v in failed.items() if k[0] == "sft"}
    if not recs and not failed:
        return
    rows = []
    for r in recs:
        ref = next((x for x in recs if x["run"] == "trl"), None)
        diff = "-"
        if ref is not None:
            diff = f"{max(abs(a['loss'] - b['loss']) / abs(b['loss']) for a, b in zip(r['logs'], ref['logs'])):.1e}"
        speed = f"{ref['steady_step_s'] / r['steady_step_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_gb'] / ref['peak_gb']:.2f}" if ref else "-"
        c = r["compile"]
        last = r["logs"][-1] if r["logs"] else {}
        rows.append([r["trainer"], r["run"], str(r["gradient_checkpointing"]), f"{r['steady_step_s']:.3f}", speed,
                     f"{r['step_s'][0]:.1f}", f"{r['peak_gb']:.2f}", mem, diff,
                     f"{last.get('loss', float('nan')):.4f}",
                     f"mean_token_accuracy {last.get('mean_token_accuracy', float('nan')):.3f}",
                     f"{sum(b['count'] for b in c['graph_breaks'])}/{c['compilations']}"])
    for name, why in failed.items():
        rows.append(list(name) + [why] + ["-"] * 9)
    lines = [f"TRL {recs[0]['trl'] if recs else '?'} SFT, {args.model} shape, NF4 double-quant, bf16, LoRA r=32 on "
             f"7 projections, {args.steps} steps (median of steps 3..). {env['card']}, torch {env['torch']}, "
             f"{env['date']}"]
    lines += common.table(["trainer", "run", "grad ckpt", "median s/step", "speed vs trl", "step 1 s", "peak GB",
                           "vs trl", "max rel loss diff", "last loss", "last metric", "breaks/compiles"], rows)
    lines += [f"  {k}: {v}" for k, v in RUNS.items() if k != "unsloth"]
    name = f"trl_{args.model}{args.name}"
    common.write(name, dict(env, model=args.model, steps=args.steps, runs=recs, failed={" ".join(k): v for k, v in
                                                                                          failed.items()}), lines)
    if not _has_matplotlib():
        return
    fig, (ax,) = common.subplots(1, 1, size=(6, 3.4))
    for r in recs:
        ax.plot(range(2, len(r["step_s"]) + 1), r["step_s"][1:], "o-", markersize=3,
                label=f"{r['run']} ({r['peak_gb']:.1f} GB)")
    ax.set_title("SFT", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("step (the first, which compiles, left out)")
    ax.set_ylabel("seconds (log)")
    ax.legend(fontsize=7)
    common.save_figure(fig, name, f"TRL SFT on {args.model}, {env['card']}, torch {env['torch']}, {env['date']}")


def report_grpo(recs, failed, args, env):
    """GRPO runs: grpo_<model><name>.* — each run's step, its sampling / training split,
    the first step (compiling, recording) and peak memory, against TRL and Unsloth."""
    import common
    recs = [r for r in recs if r["trainer"] == "grpo"]
    failed = {k[1]: v for k, v in failed.items() if k[0] == "grpo"}
    name = f"grpo_{args.model}{args.name}"
    path = os.path.join(common.RESULTS, name + ".json")
    if args.merge and os.path.exists(path):  # runs of an earlier call that this one did not run
        with open(path) as f:
            old = json.load(f)
        ran = {r["run"] for r in recs} | set(failed)
        recs = [r for r in old.get("runs", []) if r["run"] not in ran] + recs
        failed = {**{k: v for k, v in old.get("failed", {}).items() if k not in ran and
                     k not in {r["run"] for r in recs}}, **failed}
    if not recs and not failed:
        return
    ref = {n: next((x for x in recs if x["run"] == n), None) for n in ("trl", "unsloth")}
    rows = []
    for r in recs:
        vs = [f"{ref[n]['s_per_step'] / r['s_per_step']:.2f}x" if ref[n] else "-" for n in ("trl", "unsloth")]
        mem = f"{r['peak_gb'] / ref['trl']['peak_gb']:.2f}" if ref["trl"] else "-"
        rows.append([r["run"], str(r["gradient_checkpointing"]), f"{r['s_per_step']:.3f}", f"{r['sampling_s']:.3f}",
                     f"{r['training_s']:.3f}", *vs, f"{r['first_step_s']:.1f}", f"{r['first_sampling_s']:.1f}",
                     f"{r['first_sampling_s'] - r['sampling_s']:.1f}", f"{r['peak_gb']:.2f}", mem,
                     f"{r['logs'][-1].get('reward', float('nan')) if r['logs'] else float('nan'):.3f}"])
    for run, why in failed.items():
        rows.append([run, "-", why] + ["-"] * 10)
    lines = [f"TRL {recs[0]['trl'] if recs else '?'} GRPOTrainer without vLLM, {args.model} shape, NF4 double-quant, "
             f"bf16, LoRA r=32 on 7 projections, {args.prompts} prompt(s) of {args.prompt} tokens x 8 completions of "
             f"{args.new_tokens} tokens a step, beta 0.04, {args.steps} steps (medians of steps 3..). {env['card']}, "
             f"torch {env['torch']}, {env['date']}"]
    lines += common.table(["run", "grad ckpt", "s/step", "sampling s", "training s", "vs trl", "vs unsloth",
                           "step 1 s", "step 1 sampling s", "first-call extra s", "peak GB", "vs trl", "last reward"],
                          rows)
    lines += [f"  {k}: {v}" for k, v in RUNS.items()]
    common.write(name, dict(env, model=args.model, steps=args.steps, prompts=args.prompts, prompt=args.prompt,
                            new_tokens=args.new_tokens, runs=recs, failed=failed), lines)
    if not _has_matplotlib():
        return
    fig, (a1, a2) = common.subplots(1, 2, size=(10, 3.4))
    for r in recs:
        a1.plot(range(2, len(r["step_s"]) + 1), r["step_s"][1:], "o-", markersize=3, label=r["run"])
        a2.bar(r["run"], r["sampling_s"], color="tab:blue", label="sampling" if r is recs[0] else None)
        a2.bar(r["run"], r["training_s"], bottom=r["sampling_s"], color="tab:orange",
               label="training" if r is recs[0] else None)
    a1.set_yscale("log")
    a1.set_xlabel("step (the first left out)")
    a1.set_ylabel("seconds a step (log)")
    a1.legend(fontsize=7)
    a2.set_ylabel("seconds a step (median)")
    a2.legend(fontsize=7)
    common.save_figure(fig, name, f"GRPO on {args.model}, {env['card']}, torch {env['torch']}, {env['date']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--trainers", nargs="+", choices=["sft", "grpo"], default=["sft", "grpo"])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=1, help="GRPO: prompts a step (8 completions each)")
    ap.add_argument("--prompt", type=int, default=64, help="GRPO: tokens a prompt")
    ap.add_argument("--new-tokens", type=int, default=256, help="GRPO: max completion length")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--checkpoint", help="folder to keep the random-weight checkpoint in and reuse")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("--merge", action="store_true", help="GRPO: keep the other runs of an existing result file")
    ap.add_argument("--results", help="folder for the result files (default benchmarks/results; --tiny: a temp one)")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny model, 3 steps, results in a temp folder")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--trainer", "--run", "--path", "--out"):  # what the parent hands each worker
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, HERE)
    import common
    from bench_qlora import checkpoint_path
    if args.tiny:
        args.model, args.steps, args.prompt, args.new_tokens = "tiny", 3, 8, 8
        common.RESULTS = args.results or tempfile.mkdtemp(prefix="slothai-bench-trl-")
        print(f"smoke test: results in {common.RESULTS}")
    elif args.results:
        common.RESULTS = args.results
    recs, failed, env = [], {}, common.environment()
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_path(args.model, args.checkpoint or tmp)
        for trainer in args.trainers:
            for run in args.runs:
                if trainer == "sft" and run == "unsloth":
                    continue  # bench_qlora.py compares Unsloth's training step
                if run == "unsloth" and importlib.util.find_spec("unsloth") is None:
                    failed[(trainer, run)] = "unsloth not installed"
                    report_grpo(recs, failed, args, env)
                    continue
                out = os.path.join(tmp, f"{trainer}-{run}.json")
                rec, why = common.run_worker(
                    __file__, ["--worker", "--trainer", trainer, "--run", run, "--path", path, "--out", out,
                               "--model", args.model, "--steps", str(args.steps), "--prompts", str(args.prompts),
                               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)], out,
                    args.timeout, f"{trainer} {run}", UNSLOTH_COMPILE_LOCATION=tempfile.mkdtemp(prefix="unsloth-"))
                if rec is not None:
                    recs.append(rec)
                else:
                    failed[(trainer, run)] = why
                report(recs, failed, args, env)
                report_grpo(recs, failed, args, env)


if __name__ == "__main__":
    main()
