"""Pinned host <-> device copy bandwidth on one GPU, alone and beside GEMMs of the
Llama-3.1-8B MLP shape (what offloading saved activations would cost).

    python benchmarks/probe_pcie.py      # prints; results of one H100: results/pcie_h100.txt
"""
import time

import torch

N = 4096 * 14336  # one [tokens x intermediate] bf16 activation of the 8B MLP at 4096 tokens
GB = N * 2 / 1e9


def timed(fn, reps=10):
    """Seconds per call of `fn` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main():
    d = torch.empty(N, dtype=torch.bfloat16, device="cuda")
    h = torch.empty(N, dtype=torch.bfloat16, pin_memory=True)
    copies = {"D2H": lambda: h.copy_(d, non_blocking=True), "H2D": lambda: d.copy_(h, non_blocking=True)}
    print(", ".join(f"{name} {GB / timed(cp):.1f} GB/s" for name, cp in copies.items()))

    x = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(14336, 4096, dtype=torch.bfloat16, device="cuda")
    g = timed(lambda: x @ w.t(), 20)
    print(f"GEMM 4096x4096x14336 alone {g * 1e3:.3f} ms ({2 * 4096 * 4096 * 14336 / g / 1e12:.0f} TFLOP/s)")

    side = torch.cuda.Stream()
    for name, cp in copies.items():  # five copies on a side stream while 40 GEMMs run
        torch.cuda.synchronize()
        c0, c1, m0, m1 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
        with torch.cuda.stream(side):
            c0.record()
            for _ in range(5):
                cp()
            c1.record()
        m0.record()
        for _ in range(40):
            x @ w.t()
        m1.record()
        torch.cuda.synchronize()
        print(f"{name} beside GEMMs: copy {GB * 5 / (c0.elapsed_time(c1) / 1e3):.1f} GB/s, "
              f"GEMM {m0.elapsed_time(m1) / 40:.3f} ms each")


if __name__ == "__main__":
    main()
