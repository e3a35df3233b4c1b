"""Diagnostic (GPU): how far a patched model's decode logits sit from the unpatched
training forward, per step, against test_generation's bf16 tolerance -- with the
default route, with the 4-bit decode kernel off (dequantize + cuBLAS), and with the
adapters in bf16 (the fused LoRA route). Prints; writes nothing."""
import sys

import torch

sys.path.insert(0, "tests")
import test_generation as tg  # noqa: E402

from slothai.ops import nf4_linear  # noqa: E402


def run(label, model):
    ids, mask = (t.cuda() for t in tg._left_padded())
    out = tg._uncaptured(model, ids, mask)
    prompt = ids.shape[1]
    full = torch.cat([mask, torch.ones(ids.shape[0], out.sequences.shape[1] - prompt, dtype=mask.dtype,
                                       device=mask.device)], 1)
    want = tg._forward_logits(model, out.sequences, full)
    line = []
    for t in range(len(out.logits)):
        ref = want[:, prompt - 1 + t].float()
        tol = 4 * 2 ** -8 * float(ref.abs().max())
        line.append(f"{(out.logits[t] - ref).abs().max().item() / tol:.2f}")
    print(f"{label}: max|diff| / tol per step: {' '.join(line)}", flush=True)


for compile_mode in (None, "regional"):
    model = tg._cuda_model(compile=compile_mode)
    run(f"{compile_mode} default (fp32 adapters)", model)
    rows = nf4_linear.FOUR_BIT_ROWS
    nf4_linear.FOUR_BIT_ROWS = 0
    run(f"{compile_mode} 4-bit decode kernel off", model)
    nf4_linear.FOUR_BIT_ROWS = rows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    run(f"{compile_mode} bf16 adapters (fused LoRA)", model)
