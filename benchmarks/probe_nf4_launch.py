"""Where a 4-bit product's launch loses time at one row (issue 30): a fixed cost a launch, or the
rounds its 16-feature tiles make over the persistent CTAs. One product at K = 4096 and 14336,
N = 16 (one tile), then N a whole number of rounds (1-4 x the CTAs the card holds, 16 features a
tile) and one tile more, each timed cold (distinct copies cycled, as a decode step reads its
weights) and against the read-only kernel over the same bytes. A line through the whole-round
points gives the streaming rate (its slope) and the fixed cost a launch (its intercept); the
points one tile past a round say what a partial round costs.

    python benchmarks/probe_nf4_launch.py   # prints; nothing written
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_nf4_matmul as B  # noqa: E402

import slothai  # noqa: E402


def timed(n, k):
    """Cold microseconds of nf4_matmul at one row, and of the read-only kernel over its bytes."""
    w = B.weight(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # correct before timed
        want = x.double() @ slothai.dequantize_nf4(w, dtype=torch.float32).double().t()
        err = ((slothai.nf4_matmul(x, w).double() - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, f"n={n} k={k}: relative error {err:.2e}"
    nb = B.nbytes(w)
    ws = [w] + [B.weight(n, k) for _ in range(B.copies_for(nb) - 1)]
    us = B.cycle_us([lambda w=w: slothai.nf4_matmul(x, w) for w in ws])
    reads = [B.read_only(nb) for _ in range(B.copies_for(nb))]
    return nb, us, B.cycle_us(reads)


def fit(points):
    """Least squares us = fixed + MB / rate over (MB, us) points: (fixed us, rate TB/s)."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sum((p[0] - mx) ** 2 for p in points)
    return my - slope * mx, 1 / slope  # (MB per us is TB/s)


def main():
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    ctas = 2 * props.multi_processor_count  # the one-row streaming kernel: 2 CTAs an SM
    print(f"{props.name}, torch {torch.__version__}, SLOTHAI_NF4MM_CONFIG={os.environ.get('SLOTHAI_NF4MM_CONFIG', '0')}, "
          f"{ctas} CTAs at one row, read-only kernel "
          f"{B.read_gbps(112_500_000):.0f} GB/s")
    for k in (4096, 14336):
        whole = []
        for n in [16] + [r * ctas * 16 + extra for r in (1, 2, 3, 4) for extra in (0, 16)]:
            nb, us, read = timed(n, k)
            tiles = n // 16
            print(f"K {k:5d} N {n:6d} ({tiles:4d} tiles, {tiles / ctas:4.2f} rounds) {nb / 1e6:6.2f} MB: "
                  f"nf4 {us:6.2f} us ({nb / us / 1e3:5.0f} GB/s), read-only {read:6.2f} us", flush=True)
            if n % (ctas * 16) == 0:
                whole.append((nb / 1e6, us))
        fixed, rate = fit(whole)
        print(f"K {k}: whole rounds fit {fixed:.2f} us fixed a launch + bytes at {rate:.2f} TB/s")


if __name__ == "__main__":
    main()
