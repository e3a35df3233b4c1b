"""Pinned host <-> device copy bandwidth on one GPU, alone and beside GEMMs of the
Llama-3.1-8B MLP shape (what offloading saved activations would cost).

    python benchmarks/probe_pcie.py      # prints; results of one H100: results/pcie_h100.txt
"""
import time, torch
n = 4096 * 14336
d = torch.empty(n, dtype=torch.bfloat16, device="cuda")
h = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
s = torch.cuda.Stream()
def timed(fn, reps=10):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / reps
gb = n * 2 / 1e9
print(f"D2H {gb / timed(lambda: h.copy_(d, non_blocking=True)):.1f} GB/s, H2D {gb / timed(lambda: d.copy_(h, non_blocking=True)):.1f} GB/s")
x = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda"); w = torch.randn(14336, 4096, dtype=torch.bfloat16, device="cuda")
g = timed(lambda: x @ w.t(), 20)
print(f"GEMM 4096x4096x14336 alone {g * 1e3:.3f} ms ({2 * 4096 * 4096 * 14336 / g / 1e12:.0f} TFLOP/s)")
for name, cp in (("D2H", lambda: h.copy_(d, non_blocking=True)), ("H2D", lambda: d.copy_(h, non_blocking=True))):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.cuda.stream(s):
        e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
        e0.record(); [cp() for _ in range(5)]; e1.record()
    m0 = torch.cuda.Event(enable_timing=True); m1 = torch.cuda.Event(enable_timing=True)
    m0.record(); [x @ w.t() for _ in range(40)]; m1.record()
    torch.cuda.synchronize()
    print(f"{name} beside GEMMs: copy {gb * 5 / (e0.elapsed_time(e1) / 1e3):.1f} GB/s, GEMM {m0.elapsed_time(m1) / 40:.3f} ms each")
