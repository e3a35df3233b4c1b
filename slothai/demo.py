"""The demo behind `make demo`: a real bitsandbytes NF4 layer through slothai."""
import time

import torch

from .ops import dequantize_nf4


def _median_ms(fn, device, reps=20):
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def run(device=None):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_f, in_f = (4096, 4096) if device == "cuda" else (1024, 1024)
    print(f"slothai demo on {device} (torch {torch.__version__}, bitsandbytes {bnb.__version__})")
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.to(device)
    w, qs = layer.weight, layer.weight.quant_state
    print(f"  NF4 layer {out_f}x{in_f}: {w.numel()} packed bytes, blocksize {qs.blocksize}, "
          f"double-quantized scales (nested blocksize {qs.state2.blocksize})")

    ours = dequantize_nf4(w)
    with torch._dynamo.config.patch(disable=True):  # bnb's CPU path compiles per shape
        ref = bnbF.dequantize_4bit(w.data, qs)
        t_bnb = _median_ms(lambda: bnbF.dequantize_4bit(w.data, qs), device)
    same = torch.equal(ours, ref)
    print(f"  slothai.dequantize_nf4 -> {tuple(ours.shape)} {ours.dtype}, bit-identical to bitsandbytes: {same}")
    t_ours = _median_ms(lambda: dequantize_nf4(w), device)
    print(f"  median time: slothai {t_ours:.3f} ms, bitsandbytes {t_bnb:.3f} ms ({t_bnb / t_ours:.2f}x)")

    f = torch.compile(lambda x, w: x @ dequantize_nf4(w).t(), fullgraph=True)
    x = torch.randn(8, in_f, dtype=torch.bfloat16, device=device)
    torch.testing.assert_close(f(x, w), x @ ours.t())
    print("  torch.compile(fullgraph=True) over x @ dequantize_nf4(W).T: traced, no graph break, same result")
    if not same:
        raise SystemExit("demo: slothai and bitsandbytes disagree")
