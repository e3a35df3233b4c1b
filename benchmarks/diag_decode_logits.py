"""Diagnostic (GPU): how far a patched bf16 model's decode logits sit from the exact (fp32)
forward over the same sequences, per step, against the CUDA tests' bound (3x the bf16
training forward's own largest error: tests/test_generation.py) -- PEFT's fp32 adapters
with the 4-bit decode kernel on and off (dequantize + cuBLAS), and bf16 adapters (TRL's
cast), eager and regional. Prints; writes nothing.

    python benchmarks/diag_decode_logits.py      # from the repository root
"""
import importlib
import sys

import torch

sys.path.insert(0, "tests")
import test_generation as tg  # noqa: E402
from training_checks import cast_adapters  # noqa: E402

# the module (slothai.ops.nf4_linear, the attribute, is the function of that name)
nf4_linear = importlib.import_module("slothai.ops.nf4_linear")


def run(label, model):
    ids, mask = (t.cuda() for t in tg._left_padded())
    out = tg._uncaptured(model, ids, mask)
    prompt, new = ids.shape[1], len(out.logits)
    full = torch.cat([mask, torch.ones(ids.shape[0], out.sequences.shape[1] - prompt, dtype=mask.dtype,
                                       device=mask.device)], 1)
    steps = slice(prompt - 1, prompt - 1 + new)
    exact = tg._exact_forward_logits(model, out.sequences, full)[:, steps]
    train = tg._forward_logits(model, out.sequences, full)[:, steps].float()
    bound = 3 * float((train - exact).abs().max())
    errs = [float((out.logits[t].float() - exact[:, t]).abs().max()) / bound for t in range(new)]
    print(f"{label}: error / bound per step: {' '.join(f'{e:.2f}' for e in errs)} (bound {bound:.4g})", flush=True)


for compile_mode in (None, "regional"):
    model = tg._cuda_model(compile=compile_mode)
    run(f"{compile_mode}, fp32 adapters", model)
    rows = nf4_linear.FOUR_BIT_ROWS
    nf4_linear.FOUR_BIT_ROWS = 0
    run(f"{compile_mode}, fp32 adapters, 4-bit decode kernel off", model)
    nf4_linear.FOUR_BIT_ROWS = rows
    cast_adapters(model, torch.bfloat16)
    run(f"{compile_mode}, bf16 adapters", model)
