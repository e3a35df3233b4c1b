"""Decode-step attention on one GPU: one query token a row against a static cache, its query
heads grouped under their key/value head (slothai/generation/attention.py), timed per SDPA
backend and as a compiled matmul-softmax-matmul, at the Llama-3.2-1B and -3.1-8B head shapes.
Each result is checked against float64 first.

    python benchmarks/probe_decode_attention.py      # prints a table; writes nothing
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"llama-1b": (8, 4, 64), "llama-8b": (8, 4, 128)}  # kv heads, query heads a kv head, head dim
SLOTS, SEEN = 640, 400  # the cache bucket of a 128-token prompt + 512 new; slots holding tokens so far
CALLS = 100


def explicit(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)).float() * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p.to(v.dtype) @ v)


def graph_us(fn):
    """GPU microseconds a call, from a CUDA graph of CALLS calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {SLOTS} slots, {SEEN} holding tokens; "
          "µs a call (CUDA-graph replay)")
    compiled = torch.compile(explicit, fullgraph=True)
    for model, (kv, groups, d) in SHAPES.items():
        for rows in (1, 8):
            q = torch.randn(rows, kv, groups, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(rows, kv, SLOTS, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            mask = torch.zeros(rows, 1, 1, SLOTS, dtype=torch.bool, device="cuda")
            mask[..., :SEEN] = True
            scale = 1 / math.sqrt(d)
            want = explicit(q.double(), k.double(), v.double(), mask, scale)
            runs = {"sdpa (default)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)}
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                                  ("math", SDPBackend.MATH)):
                def run(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                runs[name] = run
            runs["compiled explicit"] = lambda: compiled(q, k, v, mask, scale)
            out = []
            for name, fn in runs.items():
                try:
                    err = (fn().double() - want).abs().max().item()
                    assert err < 3e-2, f"error {err:.2e}"
                    out.append(f"{name} {graph_us(fn):.1f}")
                except Exception as e:  # noqa: BLE001 -- a backend that refuses the shape is reported, not fatal
                    out.append(f"{name} n/a ({str(e).splitlines()[0][:60]})")
            print(f"{model} rows {rows}: " + ", ".join(out), flush=True)


if __name__ == "__main__":
    main()
