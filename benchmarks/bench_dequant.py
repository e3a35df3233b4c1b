"""NF4 dequantization: slothai vs bitsandbytes vs Unsloth's fast_dequantize vs
a pure-torch dequant under torch.compile, on one card, in one run.

    python benchmarks/bench_dequant.py            # needs CUDA and bitsandbytes

Correctness is checked (bit-exact against bitsandbytes) before anything is
timed. Prints a table; writes dequant.json/.txt/.png under benchmarks/results/.
"""
import ctypes
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

try:  # the real Unsloth, imported first (it patches what it imports); else the replica below
    import unsloth  # noqa: E402
    from unsloth.kernels.utils import fast_dequantize as real_unsloth_fast_dequantize  # noqa: E402
    UNSLOTH = f"unsloth {unsloth.__version__} fast_dequantize"
except ImportError:
    real_unsloth_fast_dequantize = None
    UNSLOTH = "replica of Unsloth's old two-launch fast_dequantize (unsloth not installed)"

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
from bitsandbytes.cextension import lib  # noqa: E402

import slothai  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (128256, 4096), (2048, 2048)]
DTYPES = [torch.bfloat16, torch.float16]


def unsloth_fast_dequantize(W, quant_state):
    """Unsloth's fast_dequantize (unsloth/kernels/utils.py), as it calls
    bitsandbytes: the nested scales by one C kernel into a fresh fp32 buffer,
    the offset by a torch add, the codes by a second C kernel. Unsloth 2026.10
    replaced it by one Triton launch: with unsloth installed, that one runs."""
    if real_unsloth_fast_dequantize is not None:
        return real_unsloth_fast_dequantize(W, quant_state)
    absmax, shape, dtype = quant_state.absmax, quant_state.shape, quant_state.dtype
    blocksize, offset, state2 = quant_state.blocksize, quant_state.offset, quant_state.state2
    device = W.device
    out = torch.empty(shape, dtype=dtype, device=device, requires_grad=False)
    out_absmax = torch.empty(absmax.numel(), dtype=torch.float32, device=device, requires_grad=False)
    stream = ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(device.index))
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    lib.cdequantize_blockwise_fp32(ptr(state2.code), ptr(absmax), ptr(state2.absmax), ptr(out_absmax),
                                   ctypes.c_int(state2.blocksize), ctypes.c_int(absmax.numel()), stream)
    out_absmax += offset
    fx = lib.cdequantize_blockwise_fp16_nf4 if dtype == torch.float16 else lib.cdequantize_blockwise_bf16_nf4
    fx(None, ptr(W), ptr(out_absmax), ptr(out), ctypes.c_int(blocksize), ctypes.c_int(out.numel()), stream)
    return out.t() if W.shape[0] == 1 else out


def torch_dequant(levels):
    """The same math in plain torch, for torch.compile to fuse."""
    def fn(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
        s = code2[absmax.long()] * absmax2.repeat_interleave(blocksize2)[: absmax.numel()] + offset
        b = packed.view(torch.uint8).reshape(-1)
        codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1).long()
        w = levels[codes].view(-1, blocksize) * s[:, None]
        return w.to(dtype).view(shape)
    return torch.compile(fn, dynamic=False)


def puzzle_harness(name, fx, rounds=1000):
    """The Unsloth puzzle's dequantize test: three MLPs, gate/up/down each
    dequantized and transposed, synchronized after every call; wall seconds."""
    elapsed = 0.0
    for bsz, qlen, hd, m, seed, dt in [(2, 3333, 2048, 8192, 3407, torch.float16),
                                       (5, 777, 1024, 4096, 3409, torch.bfloat16),
                                       (3, 2048, 4096, 14336, 3408, torch.bfloat16)]:
        torch.manual_seed(seed)
        layers = []
        for i, o in [(hd, m), (hd, m), (m, hd)]:
            lin = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=dt, quant_type="nf4",
                                    compress_statistics=True, quant_storage=torch.uint8)
            lin.weight = bnb.nn.Params4bit(torch.randn(o, i, dtype=dt) * 0.02, requires_grad=False,
                                           quant_type="nf4", compress_statistics=True)
            lin = lin.cuda()
            lin.weight.quant_state.dtype = dt  # as the puzzle does
            layers.append(lin)
        for layer in layers:  # warm-up and agreement
            want = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).t()
            got = fx(layer)
            assert torch.equal(got, want), f"{name}: {got.dtype} {want.dtype} {(got.float() - want.float()).abs().max()}"
        torch.cuda.synchronize()
        start = time.time()
        for _ in range(rounds):
            for layer in layers:
                fx(layer)
                torch.cuda.synchronize()
        elapsed += time.time() - start
    return elapsed


def main():
    env = common.environment()
    bw = common.copy_bandwidth_gbs()
    print(f"{env['card']}  torch {env['torch']}  bitsandbytes {bnb.__version__}  copy bandwidth {bw:.0f} GB/s")
    levels = slothai.nf4_levels().cuda()
    compiled = torch_dequant(levels)
    rows, records = [], []
    for dtype in DTYPES:
        for shape in SHAPES:
            torch.manual_seed(0)
            w = torch.randn(shape, dtype=dtype, device="cuda")
            packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            del w
            args = (packed, qs.absmax, qs.state2.code, qs.state2.absmax, qs.offset, qs.blocksize,
                    qs.state2.blocksize, list(shape), dtype)
            impls = {
                "slothai": lambda: slothai.dequantize_nf4(packed, qs),
                "bnb": lambda: bnbF.dequantize_4bit(packed, qs),
                "unsloth": lambda: unsloth_fast_dequantize(packed, qs),
                "torch.compile": lambda: compiled(*args),
            }
            torch._dynamo.reset()  # one fresh compile per shape: never the recompile limit's eager fallback
            ref = impls["bnb"]()
            for name in ("slothai", "unsloth"):
                assert torch.equal(impls[name](), ref), f"{name} differs from bitsandbytes at {shape} {dtype}"
            compiled_exact = torch.equal(impls["torch.compile"](), ref)
            times = {k: common.median_ms(f) for k, f in impls.items()}
            n = math.prod(shape)
            nbytes = n / 2 + qs.absmax.numel() + n * dtype.itemsize  # codes + uint8 scales + output
            floor_us = nbytes / (bw * 1e9) * 1e6
            rec = dict(shape=list(shape), dtype=str(dtype).split(".")[-1], bytes=nbytes, floor_us=floor_us,
                       us={k: v * 1e3 for k, v in times.items()}, torch_compile_bit_exact=compiled_exact)
            rec["speedup_vs_unsloth"] = times["unsloth"] / times["slothai"]
            rec["pct_of_copy_bw"] = 100 * floor_us / rec["us"]["slothai"]
            records.append(rec)
            rows.append([f"{shape[0]}x{shape[1]}", rec["dtype"]] + [f"{rec['us'][k]:.1f}" for k in impls] +
                        [f"{floor_us:.1f}", f"{rec['pct_of_copy_bw']:.0f}%", f"{rec['speedup_vs_unsloth']:.2f}x"])
            del packed, qs, ref
    geo = math.exp(sum(math.log(r["speedup_vs_unsloth"]) for r in records) / len(records))

    puzzle = {}
    for name, fx in [("slothai", lambda l: slothai.dequantize_nf4(l.weight).t()),
                     ("unsloth", lambda l: unsloth_fast_dequantize(l.weight.data, l.weight.quant_state).t()),
                     ("bnb", lambda l: bnbF.dequantize_4bit(l.weight.data, l.weight.quant_state).t())]:
        puzzle[name] = puzzle_harness(name, fx)

    lines = [f"NF4 dequant (blocksize 64, double-quantized), median us, CUDA events. {env['card']}, "
             f"torch {env['torch']}, {env['date']}, copy bandwidth {bw:.0f} GB/s"]
    lines += common.table(["shape", "dtype", "slothai", "bnb", "unsloth", "torch.compile", "floor", "of copy bw",
                           "vs unsloth"], rows)
    lines.append(f"geometric-mean speedup vs {UNSLOTH}: {geo:.2f}x")
    lines.append("puzzle harness (3 MLPs x gate/up/down, 1000 rounds, sync each call), s: " +
                 ", ".join(f"{k} {v:.3f}" for k, v in puzzle.items()) +
                 f"  -> slothai {puzzle['unsloth'] / puzzle['slothai']:.2f}x vs unsloth")
    payload = dict(env, copy_bandwidth_gbs=bw, bitsandbytes=bnb.__version__, shapes=records,
                   geomean_speedup_vs_unsloth=geo, unsloth=UNSLOTH, puzzle_seconds=puzzle)
    common.write("dequant", payload, lines)
    plot(records, env)


def plot(records, env):
    try:
        fig, (ax,) = common.subplots(size=(11, 4))
    except ImportError:  # plots are optional
        return
    labels = [f"{r['shape'][0]}x{r['shape'][1]}\n{r['dtype']}" for r in records]
    names = ["slothai", "unsloth", "bnb", "torch.compile"]
    width = 0.2
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(records))], [r["us"][name] for r in records], width, label=name)
    ax.plot([x + 1.5 * width for x in range(len(records))], [r["floor_us"] for r in records], "k_", ms=18,
            label="byte floor")
    ax.set_xticks([x + 1.5 * width for x in range(len(records))], labels, fontsize=7)
    ax.set_ylabel("us (median)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    common.save_figure(fig, "dequant", f"NF4 dequant, {env['card']}, torch {env['torch']}, {env['date']}")


if __name__ == "__main__":
    main()
