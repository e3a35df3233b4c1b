"""QLoRA on more than one GPU: slothai under FSDP2 and DDP against one GPU, and
what users run today (accelerate FSDP2 + PEFT + bitsandbytes, without slothai).

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 benchmarks/bench_distributed.py
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_distributed.py --device cpu --model tiny  # gloo smoke test

Llama-3.1-8B shape (random weights), NF4 double-quant, bf16 compute, LoRA r=32
alpha=64 on all 7 projections, AdamW. Every run trains on the same global
batches: one row of `--seq` tokens per GPU per step (`--accumulate k`: k rows, one
forward/backward each, DDP all-reducing at the last); the 1-GPU run takes the
same global batch as gradient accumulation over one row at a time, so its losses
are the ones the others must reproduce. Runs, in order (each on a freshly loaded
model; rank 0 writes the results after every run, so a run that hangs or fails
leaves the earlier ones written):

  1gpu                   slothai patch + regional compile, rank 0 alone
  fsdp2                  slothai patch, fully_shard_layers (each decoder layer, then the root, whose
                         frozen weights stay whole), regional compile
  fsdp2_keep             the same with reshard_after_forward=False: a layer's gathered 4-bit weights stay
                         from its forward to its backward (no second all-gather; more memory)
  ddp                    slothai patch + regional compile, DistributedDataParallel
  accelerate_fsdp2       slothai patch, accelerate's FSDP2 plugin (Accelerator.prepare), regional compile
  baseline_accelerate    accelerate's FSDP2 plugin + PEFT + bitsandbytes, no slothai, eager
  trainer_fsdp2          slothai patch + regional compile (defaults), then transformers' Trainer with an
                         `fsdp` config (version 2, each LlamaDecoderLayer): accelerate shards inside train();
                         on the CPU (accelerate's FSDP needs GPUs) the same gives Trainer DDP

Every slothai run compiles without CUDA graphs (they cannot hold FSDP2's gathered
weights; --cudagraphs turns them on for 1gpu and ddp), so all compile the same kernels.
Frozen 4-bit weight memory per GPU is counted from the tensors each rank holds
(codes + scales); memory after setup and the training peak come from the allocator.
"full GCs" counts Python's generation-2 collections during a run's steps and their
seconds (--gc-freeze: gc.freeze() after set-up): a pause on a host-bound rank stalls
the other at its next collective.
Table + JSON + PNG under benchmarks/results/ (bench_distributed_<model>.*).
"""
import argparse
import contextlib
import datetime
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink SHARP multicast off (before NCCL initialises)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slothai  # noqa: E402
from slothai import qlora  # noqa: E402
from slothai.distributed import adapter_state_dict, fully_shard_layers  # noqa: E402
from slothai.ops.nf4_weight import NF4Weight  # noqa: E402
from slothai.compiling.saves import SAVES  # noqa: E402

RUNS = ["1gpu", "fsdp2", "fsdp2_keep", "ddp", "accelerate_fsdp2", "baseline_accelerate", "trainer_fsdp2"]


class Env:
    def __init__(self, args):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.cuda = args.device == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            dist.init_process_group("nccl", device_id=self.device, timeout=datetime.timedelta(seconds=args.timeout_s))
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def log(self, msg, all_ranks=False):
        if all_ranks or self.rank == 0:
            print(f"[rank {self.rank} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocated_gb(self):
        return torch.cuda.memory_allocated() / 1e9 if self.cuda else float("nan")

    def peak_gb(self):
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else qlora.peak_memory_gb("cpu")


# ---- the model: one 4-bit checkpoint, built once by rank 0 -----------------------------------------
def quant_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def prepare_checkpoint(args, env):
    """Rank 0 draws random weights (on its GPU: seconds, not the minutes of an 8B CPU
    init), saves them, loads them back in 4-bit as users do and saves that 4-bit
    checkpoint, which every run then loads quickly. The other ranks wait on a marker
    file, not on a collective (the build can outlast a collective's timeout)."""
    root = args.cache or os.path.join(tempfile.gettempdir(), f"slothai-bench-distributed-{args.model}-{args.device}")
    marker = os.path.join(root, "READY")
    if env.rank == 0 and not os.path.exists(marker):
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        shutil.rmtree(root, ignore_errors=True)
        dense_dir, nf4_dir = os.path.join(root, "dense"), os.path.join(root, "nf4")
        torch.manual_seed(0)
        try:
            with torch.device(env.device) if env.cuda else contextlib.nullcontext():
                dense = AutoModelForCausalLM.from_config(qlora.make_config(args.model), dtype=env.dtype)
        except Exception as e:  # slower, but what qlora.build does
            env.log(f"random init on {env.device} failed ({type(e).__name__}: {e}); on the CPU")
            torch.manual_seed(0)
            dense = AutoModelForCausalLM.from_config(qlora.make_config(args.model), dtype=env.dtype)
        dense.save_pretrained(dense_dir)
        del dense
        env.reset_memory()
        path = dense_dir
        try:
            m = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=quant_config(env.dtype),
                                                     dtype=env.dtype, device_map={"": env.device})
            m.save_pretrained(nf4_dir)
            del m
            path = nf4_dir
            shutil.rmtree(dense_dir)
        except Exception as e:  # keep the dense checkpoint: every run quantizes while loading
            env.log(f"saving the 4-bit checkpoint failed ({type(e).__name__}: {e}); runs load the dense one")
        env.reset_memory()
        with open(marker, "w") as f:
            f.write(path)
        env.log(f"checkpoint {path} built in {time.perf_counter() - t:.0f} s")
    deadline = time.monotonic() + args.build_timeout_s
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {env.rank}: no checkpoint from rank 0 after {args.build_timeout_s} s")
        time.sleep(1)
    time.sleep(0.5)
    with open(marker) as f:
        return f.read().strip()


def load(path, env, args):
    torch._dynamo.reset()
    return qlora.build(path=path, device={"": env.device}, dtype=env.dtype, lora_r=args.lora_r)


def frozen_4bit_gb(model):
    """Bytes of 4-bit codes and scales this rank holds (its shard under FSDP)."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "_local_tensor", p)
        if isinstance(t, NF4Weight):
            total += sum(x.nbytes for x in (t.codes, t.absmax, t.code2, t.absmax2, t.offset) if x is not None)
        elif type(t).__name__ == "Params4bit":
            qs = t.quant_state
            total += t.data.nbytes + qs.absmax.nbytes
            if getattr(qs, "nested", False):
                total += qs.state2.absmax.nbytes + qs.state2.code.nbytes
        elif not p.requires_grad and p.dtype == torch.uint8:  # a Params4bit that lost its class
            total += t.nbytes
    return total / 1e9


class FullCollections:
    """Seconds this process spends in Python's full (generation 2) garbage collections
    while installed: on a host-bound step (FSDP2's hooks are Python) a pause on one
    rank stalls the other at the next collective."""

    def __init__(self):
        self.count, self.seconds, self._start = 0, 0.0, None

    def __call__(self, phase, info):
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.count, self.seconds, self._start = self.count + 1, self.seconds + time.perf_counter() - self._start, None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


# ---- training -----------------------------------------------------------------------------------
def train(model, env, steps, *, rows, opt=None, backward=None, lr=1e-4, label=""):
    """AdamW on `rows` (indices into each global batch) per step, one row per
    forward/backward (gradient accumulation when there are several). Returns
    [(global mean loss, seconds)] — the global mean over every rank's rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=lr)
    backward = backward or (lambda loss: loss.backward())
    out = []
    for i, ids in enumerate(steps):
        env.sync()
        t = time.perf_counter()
        total = torch.zeros((), device=env.device)
        for k, r in enumerate(rows):
            x = ids[r:r + 1]
            # DDP all-reduces the gradients at the last row's backward only (gradient accumulation)
            sync = k == len(rows) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = model(input_ids=x, labels=x).loss / len(rows)
                backward(loss)
            total += loss.detach().float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dist.get_world_size() > 1 and len(rows) < ids.shape[0]:
            dist.all_reduce(total)
            total /= ids.shape[0] // len(rows)
        value = total.item()
        env.sync()
        dt = time.perf_counter() - t
        out.append((value, dt))
        env.log(f"  [{label}] step {i + 1}/{len(steps)} loss {value:.4f} {dt:.3f} s")
    return out


def run(name, path, env, args, steps):
    """One run; returns its record (or None on ranks that take no part)."""
    mine = [env.rank * args.accumulate + k for k in range(args.accumulate)]  # this rank's rows of each global batch
    # CUDA graphs (slothai.compile's default on one GPU since 7ea3d75) cannot hold FSDP2's gathered
    # weights; off everywhere unless asked, so every run compiles the same kernels.
    compile_kw = dict(backend=args.backend, cudagraphs=args.cudagraphs if name in ("1gpu", "ddp") else False,
                      saves=None if args.saves == "none" else args.saves, memory_budget=args.memory_budget)
    env.reset_memory()
    if name == "1gpu":
        if env.rank != 0:
            return None
        model = slothai.compile(slothai.patch(load(path, env, args)), **compile_kw)
        setup = dict(frozen_4bit_gb=frozen_4bit_gb(model), allocated_gb=env.allocated_gb())
        rows, backward, opt, world = list(range(env.world * args.accumulate)), None, None, 1
    elif name in ("fsdp2", "fsdp2_keep"):
        model = slothai.patch(load(path, env, args))
        fully_shard_layers(model, reshard_after_forward=name == "fsdp2")
        slothai.compile(model, **compile_kw)
        setup = dict(frozen_4bit_gb=frozen_4bit_gb(model), allocated_gb=env.allocated_gb())
        rows, backward, opt, world = mine, None, None, env.world
    elif name == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        inner = slothai.compile(slothai.patch(load(path, env, args)), **compile_kw)
        model = DDP(inner, device_ids=[env.local_rank] if env.cuda else None)
        setup = dict(frozen_4bit_gb=frozen_4bit_gb(inner), allocated_gb=env.allocated_gb())
        rows, backward, opt, world = mine, None, None, env.world
    elif name == "trainer_fsdp2":
        return trainer_run(path, env, args, steps)
    elif name in ("accelerate_fsdp2", "baseline_accelerate"):
        accelerator = _accelerator()
        model = load(path, env, args)
        if name == "accelerate_fsdp2":
            slothai.patch(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        model, opt = accelerator.prepare(model, opt)
        env.log(f"[{name}] accelerate: {accelerator.distributed_type}, model {type(model).__name__}")
        if name == "accelerate_fsdp2":
            slothai.compile(model, **compile_kw)
        setup = dict(frozen_4bit_gb=frozen_4bit_gb(model), allocated_gb=env.allocated_gb())
        rows, backward, world = mine, accelerator.backward, env.world
    else:
        raise ValueError(name)
    env.log(f"[{name}] set up: {setup}")
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.gc_freeze:
        gc.collect()
        gc.freeze()  # what set-up made (the model, compiled code) is never traversed again
    with slothai.compile_report() as report, FullCollections() as collections:
        result = train(model, env, steps, rows=rows, opt=opt, backward=backward, lr=args.lr, label=name)
    if args.gc_freeze:
        gc.unfreeze()
    step_s = [dt for _, dt in result]
    tokens = steps[0].numel()  # the global batch, whatever the number of GPUs
    steady = statistics.median(step_s[args.warmup:])
    rec = dict(run=name, gpus=world, wrapped=type(model).__name__, losses=[v for v, _ in result], step_s=step_s, steady_step_s=steady,
               tokens_per_s=tokens / steady, peak_gb=env.peak_gb(), compile=report.to_dict(),
               full_gc=dict(count=collections.count, seconds=round(collections.seconds, 3)), **setup)
    if name in ("fsdp2", "fsdp2_keep", "ddp", "accelerate_fsdp2"):  # every rank gathers (a collective); rank 0 keeps it
        rec["lora_numel"] = sum(t.numel() for t in adapter_state_dict(getattr(model, "module", model)).values())
    del model, opt
    if name.startswith(("accelerate", "baseline")):
        _accelerator().free_memory()
    env.reset_memory()
    return rec


def trainer_run(path, env, args, steps):
    """transformers' Trainer, `fsdp` configured, on the model slothai patched, sharded and compiled."""
    import dataclasses

    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    AcceleratorState._reset_state(True)  # the Accelerator of the accelerate runs: Trainer makes its own
    _ACCELERATOR.clear()
    # As a Trainer user writes it: patch and compile, then the Trainer (accelerate) shards each
    # decoder layer inside train(); compile's default CUDA graphs go off at the first call.
    model = slothai.compile(slothai.patch(load(path, env, args)), backend=args.backend)
    setup = dict(allocated_gb=env.allocated_gb())
    # accelerate hands out consecutive batches of one row to the ranks in turn: ordered so that
    # rank r's i-th micro-batch of a step is row r * accumulate + i, as in the other runs.
    k = args.accumulate
    data = [{"input_ids": ids[r * k + i], "labels": ids[r * k + i]}
            for ids in steps for i in range(k) for r in range(env.world)]
    kw = dict(output_dir=tempfile.mkdtemp(prefix="slothai-bench-trainer-"), per_device_train_batch_size=1,
              max_steps=args.steps, gradient_accumulation_steps=k, learning_rate=args.lr,
              lr_scheduler_type="constant", weight_decay=0.0,
              max_grad_norm=0.0,  # no clipping: the other runs do not clip either
              optim="adamw_torch", report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
              dataloader_pin_memory=False, use_cpu=not env.cuda)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in fields:
        kw["train_sampling_strategy"] = "sequential"
    if env.cuda:
        kw.update(fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                  "reshard_after_forward": True})
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            env.sync()
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            env.sync()
            times[-1] = time.perf_counter() - times[-1]

    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=data, callbacks=[StepTimer()])
    with slothai.compile_report() as report:
        trainer.train()
    setup["frozen_4bit_gb"] = frozen_4bit_gb(model)  # sharded in place by the Trainer
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    env.log(f"[trainer_fsdp2] {type(trainer.model_wrapped).__name__}, losses {losses}, step s {times}, "
            f"4-bit GB held {setup['frozen_4bit_gb']:.2f}")
    steady = statistics.median(times[args.warmup:])
    rec = dict(run="trainer_fsdp2", gpus=env.world, wrapped=type(trainer.model_wrapped).__name__, losses=losses,
               step_s=times, steady_step_s=steady, tokens_per_s=steps[0].numel() / steady, peak_gb=env.peak_gb(),
               compile=report.to_dict(), sequential="train_sampling_strategy" in kw, **setup)
    del trainer, model
    env.reset_memory()
    return rec


_ACCELERATOR = []


def _accelerator():
    if not _ACCELERATOR:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                                reshard_after_forward=True, cpu_ram_efficient_loading=False,
                                                state_dict_type="SHARDED_STATE_DICT")
        _ACCELERATOR.append(Accelerator(fsdp_plugin=plugin))
    return _ACCELERATOR[0]


# ---- results --------------------------------------------------------------------------------------
def report(recs, args, env_info):
    one = next((r for r in recs if r["run"] == "1gpu" and "error" not in r), None)
    rows = []
    for r in recs:
        if "error" in r:
            rows.append([r["run"], "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", r["error"][:90]])
            continue
        scale = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], one["losses"])) if one else float("nan")
        r["max_rel_loss_diff_vs_1gpu"] = rel
        c = r["compile"]
        rows.append([r["run"], str(r["gpus"]), f"{r['steady_step_s']:.3f}", f"{r['tokens_per_s']:.0f}", scale,
                     f"{r['frozen_4bit_gb']:.2f}", f"{r['allocated_gb']:.1f}", f"{r['peak_gb']:.1f}", f"{rel:.1e}",
                     f"{sum(b['count'] for b in c['graph_breaks'])}/{c['compilations']}",
                     "{count} / {seconds:.2f}".format(**r["full_gc"]) if "full_gc" in r else "-", ""])
    lines = [f"Distributed QLoRA, {args.model} shape, NF4 double-quant, {'bf16' if args.device == 'cuda' else 'fp32'}, "
             f"LoRA r={args.lora_r} on 7 projections, "
             f"global batch {args.world * args.accumulate} x {args.seq} tokens per step"
             f"{f' ({args.accumulate} rows a GPU, accumulated)' if args.accumulate > 1 else ''}, "
             f"{args.steps} steps (median of the last {args.steps - args.warmup}), AdamW. {env_info['card']} x "
             f"{args.world}, torch {env_info['torch']}, {env_info['date']}. Memory per GPU (rank 0)."
             + (" gc.freeze() after set-up." if args.gc_freeze else "")]
    lines += common.table(["run", "GPUs", "s/step", "tokens/s", "vs 1 GPU", "4-bit weights GB", "after setup GB",
                           "peak GB", "max rel loss diff", "breaks/compiles", "full GCs (n / s)", "error"], rows)
    name = f"bench_distributed_{args.model}{args.name}"
    common.write(name, dict(env_info, model=args.model, world=args.world, accumulate=args.accumulate, seq=args.seq,
                            steps=args.steps,
                            warmup=args.warmup, lora_r=args.lora_r, gc_freeze=args.gc_freeze, nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
                            runs=recs), lines)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in recs if "error" not in r]
        if not ok:
            return
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        labels = [r["run"] for r in ok]
        a1.bar(labels, [r["tokens_per_s"] for r in ok])
        a1.set_ylabel("tokens / s (global)")
        a2.bar(labels, [r["peak_gb"] for r in ok], label="training peak")
        a2.bar(labels, [r["frozen_4bit_gb"] for r in ok], label="4-bit weights held")
        a2.set_ylabel("GB per GPU (rank 0)")
        a2.legend()
        for ax in (a1, a2):
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.suptitle(f"QLoRA {args.model}, {env_info['card']} x {args.world}, {env_info['date']}", fontsize=9)
        fig.tight_layout()
        for folder in filter(None, [common.RESULTS, os.environ.get("OUT")]):
            fig.savefig(os.path.join(folder, f"{name}.png"), dpi=110)
    except ImportError:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seq", type=int, default=None, help="tokens per GPU per step (default 4096; cpu: 64)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accumulate", type=int, default=1,
                    help="rows per GPU per step, one forward/backward each (gradient accumulation; DDP all-reduces "
                         "at the last)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median (compiling)")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS)
    ap.add_argument("--backend", default=None, help="torch.compile backend (default inductor; cpu: aot_eager)")
    ap.add_argument("--cudagraphs", action="store_true", help="CUDA graphs for the 1gpu and ddp runs")
    ap.add_argument("--saves", default="lean", choices=[*SAVES, "none"],
                    help="slothai.compile's saves (none: the partitioner decides, under --memory-budget)")
    ap.add_argument("--memory-budget", type=float, default=None, help="slothai.compile's memory_budget (saves none)")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() after each run's set-up: full collections then skip the model's objects")
    ap.add_argument("--budget-s", type=float, default=360, help="start no new run after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=300, help="collective timeout")
    ap.add_argument("--build-timeout-s", type=float, default=600)
    ap.add_argument("--cache", default=None, help="where the 4-bit checkpoint is kept (default: a /tmp folder)")
    ap.add_argument("--name", default="", help="suffix of the result files")
    args = ap.parse_args()
    args.seq = args.seq or (4096 if args.device == "cuda" else 64)
    args.backend = args.backend or ("inductor" if args.device == "cuda" else "aot_eager")
    t0 = time.perf_counter()
    env = Env(args)
    args.world = env.world
    env_info = common.environment()
    if env.cuda:
        env_info["card"] = torch.cuda.get_device_name(env.device)
    env.log(f"{env.world} ranks, {env_info}, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
    path = prepare_checkpoint(args, env)
    vocab = qlora.make_config(args.model).vocab_size
    steps = list(qlora.batches(vocab, env.world * args.accumulate, [args.seq], args.steps, env.device, seed=1))
    recs = []
    for name in args.runs:
        if time.perf_counter() - t0 > args.budget_s:
            recs.append(dict(run=name, error=f"skipped: {args.budget_s:.0f} s budget spent"))
            continue
        env.log(f"=== {name} ({time.perf_counter() - t0:.0f} s in)")
        try:
            rec = run(name, path, env, args, steps)
        except Exception as e:
            env.log(f"[{name}] failed: {traceback.format_exc()}", all_ranks=True)
            rec = dict(run=name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       traceback=traceback.format_exc()[-3000:])
            env.reset_memory()
        if rec is not None:
            recs.append(rec)
        dist.barrier()
        if env.rank == 0:
            report(recs, args, env_info)  # after every run: a later hang leaves these written
    env.log(f"done in {time.perf_counter() - t0:.0f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
