"""Does an L2 prefetch of the next 4-bit product's bytes, issued while other kernels run, make
that product faster? (A decode step's small kernels between two products leave DRAM idle.)
CUDA graphs of 20 rounds of [8B gate/up grouped] [a kernel prefetching the same leading share of
every row of down_proj's codes into L2, MB in all, or an empty one] [a sleeping kernel of G us] [down_proj], per round;
and whether a prefetching kernel lasts until its lines arrive (its own device time).

    python benchmarks/probe_l2_prefetch.py   # builds probe_l2_prefetch.cu with nvcc; prints;
                                              # results of one H100: results/nf4_matmul_l2_prefetch_h100.txt
"""
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_nf4_matmul as B  # noqa: E402

import slothai  # noqa: E402

SO = os.path.join(tempfile.mkdtemp(), "probe_l2_prefetch.so")
subprocess.run(["nvcc", "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90,code=sm_90", "-o", SO,
                os.path.join(HERE, "probe_l2_prefetch.cu")], check=True)
lib = ctypes.CDLL(SO)
S = lambda: ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)  # noqa: E731
torch.manual_seed(0)
SH = B.MODELS["llama-8b"]
ws = {p: B.weight(n, k) for p, (n, k) in SH.items()}
xs = {p: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for p, (n, k) in SH.items()}
B.check("llama-8b", ws, (1,))  # every product against float64 before any timing
gu = lambda: slothai.ops.nf4_linear_group(xs["gate_proj"], [ws["gate_proj"], ws["up_proj"]])  # noqa: E731
down = lambda: slothai.ops.nf4_linear_group(xs["down_proj"], [ws["down_proj"]])  # noqa: E731
packed = ws["down_proj"].data
print("down packed", packed.numel() / 1e6, "MB; ptr % 128 =", packed.data_ptr() % 128)


ROWS, ROW = packed.numel() // 7168, 7168  # down: 4096 rows of 14336 codes (packed is [n*k/2, 1])


def pf(kind, mb, ctas=132):
    """Prefetch the first mb/total of every row of down's codes (its CTAs all start at once)."""
    prefix = min(ROW, int(ROW * mb * 1e6 / packed.numel())) & ~127
    f = lib.pf_lines if kind == "lines" else lib.pf_bulk
    return lambda: f(ctypes.c_void_p(packed.data_ptr()), ctypes.c_int64(ROWS), ctypes.c_int64(ROW), ctypes.c_int64(prefix),
                     ctypes.c_int(ctas), S())


def seq(gap_us, pre):
    def fns():
        out = [gu]
        if pre:
            out.append(pre)
        if gap_us:
            out.append(lambda: lib.sleep_ns(ctypes.c_int(int(gap_us * 1000)), S()))
        out.append(down)
        return out
    return fns()


nothing = lambda: lib.pf_lines(ctypes.c_void_p(packed.data_ptr()), ctypes.c_int64(0), ctypes.c_int64(ROW), ctypes.c_int64(0),
                               ctypes.c_int(1), S())  # noqa: E731
for gap in (0, 4, 8):
    base = B.graph_us(seq(gap, nothing))
    row = [f"gap {gap} us: empty kernel {base:6.1f}"]
    for kind in ("lines", "bulk"):
        for mb in (4, 8, 16, 30):
            us = B.graph_us(seq(gap, pf(kind, mb)))
            row.append(f"{kind} {mb}MB {us:6.1f} ({base - us:+5.1f})")
    print("  ".join(row), flush=True)

sl = B.graph_us([lambda: lib.sleep_ns(ctypes.c_int(8000), S())])
print(f"sleep 8 us kernel alone: {sl:.1f} us; gate/up alone {B.graph_us([gu]):.1f}; down alone {B.graph_us([down]):.1f}")
# prefetch down fully, then down: how fast is down from L2?
print(f"down after a 30 MB line prefetch + 20 us sleep: {B.graph_us([pf('lines', 31), lambda: lib.sleep_ns(ctypes.c_int(20000), S()), down]):.1f}"
      f" vs empty {B.graph_us([nothing, lambda: lib.sleep_ns(ctypes.c_int(20000), S()), down]):.1f}")
# does a prefetching kernel last until its lines arrive? its own device time, 16 MB, lines and bulk
for kind in ("lines", "bulk"):
    f = pf(kind, 16)
    f()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            f()
            lib.sleep_ns(ctypes.c_int(20000), S())
        torch.cuda.synchronize()
    d = [ev.device_time for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA and "prefetch" in ev.name]
    print(f"{kind} prefetch kernel, 16 MB: device time median {statistics.median(d):.1f} us ({len(d)} kernels)")
