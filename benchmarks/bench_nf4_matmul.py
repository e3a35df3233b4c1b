"""The 4-bit product at decode shapes: slothai's nf4_matmul (the weight read
4-bit) vs today's dequantize + cuBLAS vs bitsandbytes' own `matmul_4bit` (its
fused gemv / gemm kernels with no autograd), on Llama-3.2-1B's and
Llama-3.1-8B's seven projections, M = 1..64 rows, one card, one run.

    python benchmarks/bench_nf4_matmul.py            # needs CUDA and bitsandbytes
    python benchmarks/bench_nf4_matmul.py --quick    # M in 1, 4, 8, 16, 32, 64 only

Correctness first: every run's output is compared with a float64 product of the
dequantized weight. Times are GPU times of CUDA-graph replays (at least 20 calls a
graph, median of 30 replays): what a decode step replayed as a graph sees, without the
host's per-call cost. Each run cycles through distinct copies of its weights, twice
the L2 between two reads of one copy, so that the weights come from memory as in a
decode step (`--warm`: the one weight, which stays in the L2 where it fits, as the
result files up to nf4_matmul_h100_low.* were timed). "layer" is the seven projections
in one graph; "layer, grouped" the same layer as a compiled decode step runs it
(slothai/generation/grouping.py):
q/k/v and gate/up one nf4_linear_group launch each, o and down alone. The read
bandwidth is a plain read-only Triton kernel (int32 loads summed) over a buffer of one
8B layer's 4-bit bytes. Writes nf4_matmul.json/.txt/.png under benchmarks/results/.
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import bitsandbytes as bnb  # noqa: E402

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
except ImportError:  # --render needs no GPU
    triton = None

import slothai  # noqa: E402

MODELS = {  # (out_features, in_features) of each projection
    "llama-1b": dict(q_proj=(2048, 2048), k_proj=(512, 2048), v_proj=(512, 2048), o_proj=(2048, 2048),
                     gate_proj=(8192, 2048), up_proj=(8192, 2048), down_proj=(2048, 8192)),
    "llama-8b": dict(q_proj=(4096, 4096), k_proj=(1024, 4096), v_proj=(1024, 4096), o_proj=(4096, 4096),
                     gate_proj=(14336, 4096), up_proj=(14336, 4096), down_proj=(4096, 14336)),
}
CALLS = 20
CONFIGS = 7  # SLOTHAI_NF4MM_CONFIG 0..6: launch_decode's cases in csrc/core/nf4_matmul_cuda.cu
SWEEP_M = tuple(int(m) for m in os.environ.get("SWEEP_M", "1 8 16").split())  # (rows; SWEEP_M="1" for a quick bisect)


def weight(n, k):
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, quant_type="nf4")
    return lin.cuda().weight


def nbytes(w):
    qs = w.quant_state
    return (w.data.numel() + qs.absmax.numel() * qs.absmax.element_size()
            + qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4)


# A layer's products that share x, as the decode step's graph pass groups them.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def grouped_layer(ws, xs, rank=0):
    """The layer's calls as a compiled decode step makes them: one nf4_linear_group per group
    (with `rank`, each with a LoRA term of that rank in fp32, PEFT's default, its A(x) given)."""
    if not rank:
        return [lambda g=g: slothai.ops.nf4_linear_group(xs[g[0]], [ws[p] for p in g]) for g in GROUPS]
    m = next(iter(xs.values())).shape[0]
    lx = {p: torch.randn(m, rank, device="cuda") for p in ws}
    lb = {p: torch.randn(w.quant_state.shape[0], rank, device="cuda") * 0.01 for p, w in ws.items()}
    return [lambda g=g: slothai.ops.nf4_linear_group(xs[g[0]], [ws[p] for p in g], lora_x=[lx[p] for p in g],
                                                     lora_b=[lb[p] for p in g], lora_scale=[2.0] * len(g))
            for g in GROUPS]


RUNS = {
    "slothai": lambda x, w: slothai.nf4_matmul(x, w),
    "dequant+cublas": lambda x, w: x @ slothai.dequantize_nf4(w, dtype=x.dtype).t(),
    "bitsandbytes": lambda x, w: bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state),
}


def graph_us(fns, calls=CALLS):
    """GPU microseconds of one round of `fns`, replayed from a CUDA graph of `calls` rounds
    (or, where a run cannot be captured, CUDA-event time of `calls` eager rounds)."""
    try:
        return _graph_us(fns, calls)
    except RuntimeError as e:
        print(f"  (not capturable, timed eager: {str(e).splitlines()[0][:100]})", flush=True)
        torch.cuda.synchronize()

        def rounds():
            for _ in range(calls):
                for f in fns:
                    f()
        with torch.no_grad():
            return common.median_ms(rounds, reps=20, warmup=3) * 1e3 / calls


def copies_for(nb, warm=False):
    """How many distinct copies of `nb` bytes a timing cycles through so that each has left the L2
    when its turn comes again (twice the L2 between two reads of one copy), as in a decode step,
    which reads every layer's weights once; 1 with `warm` (the weight stays in the L2 if it fits)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return 1 if warm else max(1, -(-2 * l2 // nb))


def cycle_us(fns):
    """GPU microseconds of one call, `fns` being one call each on distinct copies (copies_for):
    each graph round calls every copy once, and at least CALLS calls a graph."""
    return graph_us(fns, calls=max(2, -(-CALLS // len(fns)))) / len(fns)


def _graph_us(fns, calls):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        for _ in range(calls):
            for f in fns:
                f()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(times)


if triton is not None:
    @triton.jit
    def _read(src, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + tl.program_id(0), tl.sum(tl.load(src + offs, mask=offs < n, other=0)))


def read_only(nb):
    """A read-only Triton kernel over `nb` bytes (each program sums 16 KB of int32 and stores one
    number), its sum checked once: the launch, to time."""
    buf = torch.randint(0, 7, (nb // 4,), dtype=torch.int32, device="cuda")
    block = 4096
    out = torch.empty(triton.cdiv(buf.numel(), block), dtype=torch.int32, device="cuda")
    run = lambda: _read[(out.numel(),)](buf, out, buf.numel(), BLOCK=block, num_warps=8)  # noqa: E731
    run()
    assert out.sum().item() == buf.sum().item(), "read-only kernel: wrong sum"
    return run


def read_gbps(nb):
    """The card's read bandwidth: read_only over `nb` bytes, timed like the runs. (torch.sum was
    measured at 695 GB/s on an H200 here, below what nf4_matmul itself reads: no ceiling.)"""
    return nb // 4 * 4 / graph_us([read_only(nb)]) / 1e3


def sweep():
    """Tuning: each SLOTHAI_NF4MM_CONFIG of the decode kernel (csrc/core/nf4_matmul_cuda.cu) in its
    own process (the config is read once), slothai alone at each SWEEP_M; prints, writes nothing."""
    import subprocess
    scores = {}
    for c in [int(c) for c in os.environ.get("SWEEP_CONFIGS", "").split()] or range(CONFIGS):  # (a subset: SWEEP_CONFIGS="0 3")
        try:  # (a config that hangs -- a tuning variant waiting on a barrier -- is out too)
            got = subprocess.run([sys.executable, os.path.abspath(__file__), "--sweep-child"], capture_output=True,
                                 text=True, env=dict(os.environ, SLOTHAI_NF4MM_CONFIG=str(c)),
                                 timeout=float(os.environ.get("SWEEP_TIMEOUT", "120")))
        except subprocess.TimeoutExpired:
            print(f"config {c} passed its {os.environ.get('SWEEP_TIMEOUT', '120')} s limit", flush=True)
            continue
        print(got.stdout, end="", flush=True)
        if got.returncode:
            print(f"config {c} failed:\n{got.stderr[-800:]}", flush=True)
            continue
        scores[c] = float(got.stdout.split("SCORE ")[1].split()[0])
    nb = sum(nbytes(weight(*nk)) for nk in MODELS["llama-8b"].values())
    print(f"read-only kernel {read_gbps(nb):.0f} GB/s over {nb / 1e6:.1f} MB (an 8B layer's bytes)")
    one = torch.zeros(1, device="cuda")  # the floor of a launch in these timings: a kernel that does ~nothing
    print(f"one-element add: {graph_us([lambda: one.add_(1)]):.2f} us a launch (graph replay, back to back)")
    print(f"best {min(scores, key=scores.get) if scores else 'none'}  (sum of both layers' time at m = {SWEEP_M}: "
          + ", ".join(f"{c}: {v:.1f}" for c, v in scores.items()) + ")")


def sweep_child():
    out, score = [f"config {os.environ['SLOTHAI_NF4MM_CONFIG']}:"], 0.0
    for model, shapes in MODELS.items():
        ws = {p: weight(*nk) for p, nk in shapes.items()}
        for m in SWEEP_M:
            xs = {p: torch.randn(m, w.quant_state.shape[1], device="cuda", dtype=torch.bfloat16) for p, w in ws.items()}
            for p, w in ws.items():  # a config that computes wrong is out, whatever its time
                with torch.no_grad():
                    want = RUNS["dequant+cublas"](xs[p], w).float()
                    err = ((slothai.nf4_matmul(xs[p], w).float() - want).abs().max() / want.abs().max()).item()
                assert err < 2e-2, f"config {os.environ['SLOTHAI_NF4MM_CONFIG']} {model} {p} m={m}: error {err:.2e}"
            per = [graph_us([lambda w=w, x=xs[p]: slothai.nf4_matmul(x, w)]) for p, w in ws.items()]
            layer = graph_us([lambda w=w, x=xs[p]: slothai.nf4_matmul(x, w) for p, w in ws.items()])
            grouped = graph_us(grouped_layer(ws, xs))
            lora = graph_us(grouped_layer(ws, xs, rank=32))
            nb = sum(nbytes(w) for w in ws.values())
            score += layer
            out.append(f"  {model} m={m}: layer {layer:.1f} us ({nb / layer / 1e3:.0f} GB/s), grouped {grouped:.1f} "
                       f"({nb / grouped / 1e3:.0f} GB/s), with fp32 LoRA r=32 {lora:.1f}; "
                       "per proj " + " ".join(f"{p[:-5]} {u:.1f}" for p, u in zip(ws, per)))
    print("\n".join(out) + f"\nSCORE {score:.2f}", flush=True)


def check(model, ws, ms):
    """Every run against float64 on the dequantized weight: error within bf16 rounding of the output."""
    for proj, w in ws.items():
        wd = slothai.dequantize_nf4(w, dtype=torch.float32).double()
        for m in (ms[0], ms[-1]):
            x = torch.randn(m, w.quant_state.shape[1], device="cuda", dtype=torch.bfloat16)
            want = x.double() @ wd.t()
            for run, f in RUNS.items():
                with torch.no_grad():
                    err = (f(x, w).double() - want).abs().max().item() / want.abs().max().item()
                assert err < 2e-2, f"{model} {proj} m={m} {run}: relative error {err:.3e}"
    for m in (ms[0], ms[-1]):  # the grouped launches: each output nf4_linear's, bit for bit (past
        # nf4_linear.FOUR_BIT_ROWS rows both are dequantize + cuBLAS, not nf4_matmul's kernel)
        xs = {p: torch.randn(m, w.quant_state.shape[1], device="cuda", dtype=torch.bfloat16) for p, w in ws.items()}
        for g in GROUPS:
            with torch.no_grad():
                outs = slothai.ops.nf4_linear_group(xs[g[0]], [ws[p] for p in g])
                for p, out in zip(g, outs):
                    assert torch.equal(out, slothai.nf4_linear(xs[g[0]], ws[p])), f"{model} {p} m={m}: grouped differs"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--m", type=int, nargs="+", help="row counts to time (overrides --quick)")
    ap.add_argument("--name", default="nf4_matmul")
    ap.add_argument("--warm", action="store_true", help="time each weight alone, in the L2 where it fits "
                    "(how nf4_matmul_h100_low.* and the files before it were timed); default: cycle through copies (copies_for)")
    ap.add_argument("--sweep", action="store_true", help="time the decode kernel's tuning configs, then exit")
    ap.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--render", metavar="JSON", help="write the tables and plot of a result JSON (as --name), then exit")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        if not {"copy_gbps", "l2_weights"} <= res.keys():  # (the runs before 2026-12-07 wrote other tables)
            sys.exit(f"--render: {args.render} is a run from before the cycled weights (no copy_gbps / l2_weights)")
        return report(args.name, res)
    if args.sweep or args.sweep_child:
        return sweep() if args.sweep else sweep_child()
    ms = [1, 4, 8, 16, 32, 64] if args.quick else [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    ms = args.m or ms
    env = common.environment()
    rows = []
    weights = {model: {p: weight(*nk) for p, nk in shapes.items()} for model, shapes in MODELS.items()}
    layer_bytes = {model: sum(nbytes(w) for w in ws.values()) for model, ws in weights.items()}
    gbps = read_gbps(layer_bytes["llama-8b"])
    copy_gbps = common.copy_bandwidth_gbs()
    for model, ws in weights.items():
        check(model, ws, ms)
        # Each projection and layer timed over distinct copies of its weights, so that they are read
        # from memory as in a decode step (with --warm: the one weight, in the L2 where it fits).
        copies = {p: [w] + [weight(*w.quant_state.shape) for _ in range(copies_for(nbytes(w), args.warm) - 1)]
                  for p, w in ws.items()}
        layers = [{p: copies[p][i] for p in ws} for i in range(copies_for(layer_bytes[model], args.warm))]
        for m in ms:
            xs = {p: torch.randn(m, w.quant_state.shape[1], device="cuda", dtype=torch.bfloat16) for p, w in ws.items()}
            for run, f in RUNS.items():
                for proj, w in ws.items():
                    n, k = w.quant_state.shape
                    us = cycle_us([lambda w=c, x=xs[proj]: f(x, w) for c in copies[proj]])
                    rows.append(dict(model=model, proj=proj, n=n, k=k, m=m, run=run, us=round(us, 2),
                                     gbps=round(nbytes(w) / us / 1e3, 1)))
                us = cycle_us([lambda lay=lay: [f(xs[p], w) for p, w in lay.items()] for lay in layers])
                rows.append(dict(model=model, proj="layer", n=0, k=0, m=m, run=run, us=round(us, 2),
                                 gbps=round(layer_bytes[model] / us / 1e3, 1)))
            for run, rank in (("slothai-grouped", 0), ("slothai-grouped-lora32", 32)):
                us = cycle_us([lambda fns=grouped_layer(lay, xs, rank=rank): [g() for g in fns] for lay in layers])
                rows.append(dict(model=model, proj="layer", n=0, k=0, m=m, run=run, us=round(us, 2),
                                 gbps=round(layer_bytes[model] / us / 1e3, 1)))
            print(f"{model} m={m} done", flush=True)
        # The floor a launch allows: the read-only kernel over each projection's bytes, and over each
        # group's in the grouped layer's four launches, over as many distinct buffers as the runs.
        for proj, w in ws.items():
            us = cycle_us([read_only(nbytes(w)) for _ in copies[proj]])
            rows += [dict(model=model, proj=proj, n=w.quant_state.shape[0], k=w.quant_state.shape[1], m=m,
                          run="read-only", us=round(us, 2), gbps=round(nbytes(w) / us / 1e3, 1)) for m in ms]
        us = cycle_us([lambda fns=[read_only(sum(nbytes(ws[p]) for p in g)) for g in GROUPS]: [r() for r in fns]
                       for _ in layers])
        rows += [dict(model=model, proj="layer", n=0, k=0, m=m, run="read-only", us=round(us, 2),
                      gbps=round(layer_bytes[model] / us / 1e3, 1)) for m in ms]
        del copies, layers

    report(args.name, dict(env, bitsandbytes=bnb.__version__, read_gbps=round(gbps, 1), copy_gbps=round(copy_gbps, 1),
                           l2_weights="warm" if args.warm else "cycled", rows=rows))


def report(name, res):
    """The tables and the plot of a run (`res`: what nf4_matmul.json holds); --render calls it on a
    JSON brought back without them."""
    common.write(name, res, table_lines(res))
    plot(name, res)


def table_lines(res):
    """The printed tables: a header, then per model each projection and the layer against m."""
    rows, gbps = res["rows"], res["read_gbps"]
    ms = sorted({r["m"] for r in rows})
    layer_bytes = {model: max(r["us"] * r["gbps"] * 1e3 for r in rows if r["model"] == model and r["proj"] == "layer")
                   for model in MODELS}  # (from the rows: bytes = GB/s x µs, to well under the 0.1 MB printed)
    lines = [
        f"# {res['card']}, torch {res['torch']}, bitsandbytes {res['bitsandbytes']}, {res['date']}; "
        f"read-only kernel {gbps:.0f} GB/s over {layer_bytes['llama-8b'] / 1e6:.1f} MB; "
        f"device copy {res['copy_gbps']:.0f} GB/s (read + written, 1 GiB)",
        "# µs per call (GPU time of CUDA-graph replays); GB/s = the weight's 4-bit bytes / time; read-only: "
        "the read-only kernel over the same bytes (a layer: as the grouped layer's four launches), the floor "
        "of a launch; slothai-grouped-lora32: the grouped layer with an fp32 LoRA term of rank 32; "
        + ("--warm: each weight alone, in the L2 where it fits" if res["l2_weights"] == "warm" else
           "each run cycles through distinct copies of its weights (twice the L2 between two reads of one), "
           "so that they come from memory as in a decode step")]
    for model in MODELS:
        for proj in [*MODELS[model], "layer"]:
            lines.append(f"\n{model} {proj}" + (f" ({layer_bytes[model] / 1e6:.1f} MB)" if proj == "layer" else ""))
            runs = [*RUNS, *(["slothai-grouped", "slothai-grouped-lora32"] if proj == "layer" else []), "read-only"]
            header = ["m"] + [f"{r} µs" for r in runs] + ["slothai GB/s", "vs dequant", "vs bnb"]
            body = []
            for m in ms:
                got = {r["run"]: r for r in rows if r["model"] == model and r["proj"] == proj and r["m"] == m}
                s = got["slothai"]["us"]
                body.append([m] + [got[r]["us"] for r in runs] + [got["slothai"]["gbps"],
                            f"{got['dequant+cublas']['us'] / s:.2f}x", f"{got['bitsandbytes']['us'] / s:.2f}x"])
            lines += common.table(header, body)
    return lines


def plot(name, res):
    """Per model the layer's time and GB/s against m, each run a line, the read-only kernel's rate dashed."""
    rows, gbps = res["rows"], res["read_gbps"]
    fig, axes = common.subplots(2, 2, size=(11, 3.6))
    for i, model in enumerate(MODELS):
        for run in [*RUNS, "slothai-grouped", "slothai-grouped-lora32", "read-only"]:
            pts = [r for r in rows if r["model"] == model and r["proj"] == "layer" and r["run"] == run]
            axes[2 * i].plot([r["m"] for r in pts], [r["us"] for r in pts], marker="o", label=run)
            axes[2 * i + 1].plot([r["m"] for r in pts], [r["gbps"] for r in pts], marker="o", label=run)
        axes[2 * i].set(title=f"{model}: one layer's 7 projections", xlabel="rows of x (M)", ylabel="µs",
                        xscale="log", yscale="log")
        axes[2 * i + 1].axhline(gbps, color="k", ls="--", lw=1, label=f"read-only kernel {gbps:.0f} GB/s")
        axes[2 * i + 1].set(title=f"{model}: 4-bit bytes / time", xlabel="rows of x (M)", ylabel="GB/s",
                            xscale="log")
        for ax in axes[2 * i:2 * i + 2]:
            ax.legend(fontsize=7)
    common.save_figure(fig, name, f"NF4 product at decode shapes, {res['card']}, {res['date']}")


if __name__ == "__main__":
    main()
