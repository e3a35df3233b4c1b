"""Where an 8B decoder layer's 4-bit products lose time at one row (issue 30): per launch (the
grouped decode step's four: q/k/v, o, gate/up, down), the kernel's own device time (torch
profiler, eager launches) against the graph-replayed time per launch, and the read-only Triton
kernel over the same byte counts in the same four launches -- the floor four launches allow.

    python benchmarks/probe_nf4_floor.py   # prints; results of one H100: results/nf4_matmul_floor_h100.txt
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_nf4_matmul as B  # noqa: E402

import slothai  # noqa: E402

SHAPES = B.MODELS["llama-8b"]
torch.manual_seed(0)
ws = {p: B.weight(n, k) for p, (n, k) in SHAPES.items()}
xs = {p: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for p, (n, k) in SHAPES.items()}
B.check("llama-8b", ws, (1,))  # every product against float64 before any timing
launches = B.grouped_layer(ws, xs)
names = ["+".join(g) for g in B.GROUPS]
nbs = [sum(B.nbytes(ws[p]) for p in g) for g in B.GROUPS]

# 1. graph-replayed, one launch kind at a time and the four in sequence
for name, fn, nb in zip(names, launches, nbs):
    us = B.graph_us([fn])
    print(f"graph {name:28s} {nb / 1e6:6.1f} MB {us:6.1f} us {nb / us / 1e3:5.0f} GB/s", flush=True)
layer = B.graph_us(launches)
print(f"graph layer (4 launches)             {sum(nbs) / 1e6:6.1f} MB {layer:6.1f} us {sum(nbs) / layer / 1e3:5.0f} GB/s")


# 2. the read-only kernel over the same byte counts, alone and as four launches
reads = [B.read_only(nb) for nb in nbs]
for name, fn, nb in zip(names, reads, nbs):
    us = B.graph_us([fn])
    print(f"read  {name:28s} {nb / 1e6:6.1f} MB {us:6.1f} us {nb / us / 1e3:5.0f} GB/s")
four = B.graph_us(reads)
print(f"read  layer (4 launches)             {sum(nbs) / 1e6:6.1f} MB {four:6.1f} us {sum(nbs) / four / 1e3:5.0f} GB/s")
one = B.graph_us([B.read_only(sum(nbs))])
print(f"read  layer (1 launch)               {sum(nbs) / 1e6:6.1f} MB {one:6.1f} us {sum(nbs) / one / 1e3:5.0f} GB/s")
print(f"nf4 layer at {100 * four / layer:.0f}% of the four-launch read floor, {100 * one / layer:.0f}% of one launch's")


# 3. device time of each kernel (profiler; eager launches, 30 each)
def device_us(fn):
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(30):
                fn()
            torch.cuda.synchronize()
    d = [ev.device_time for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    return statistics.median(d), len(d)


for kind, fns in (("nf4 ", launches), ("read", reads)):
    for name, fn, nb in zip(names, fns, nbs):
        us, n = device_us(fn)
        print(f"kernel {kind} {name:28s} {n:3d} kernels, median {us:6.1f} us ({nb / us / 1e3:5.0f} GB/s)")
