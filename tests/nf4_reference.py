"""Independent NF4 references shared by the dequant_nf4 and nf4_linear tests:
bitsandbytes itself, and the exact fp32 recovery (docs/design.md) written out in torch."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def quantize(w, blocksize=64, nested=True, storage=torch.uint8):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                              quant_storage=storage)


def bnb_dequantize(packed, state):
    # bitsandbytes' CPU path wraps itself in torch.compile per shape; keep it eager.
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(packed, state)


def codes_and_scales(packed, state):
    """Each weight's 4-bit code, and its block's fp32 scale in bitsandbytes' order of operations."""
    n = state.shape.numel()
    b = packed.view(torch.uint8).reshape(-1).long()
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    if state.nested:
        blocks = torch.arange(state.absmax.numel(), device=packed.device)
        s = state.state2.code[state.absmax.long()] * state.state2.absmax[blocks // state.state2.blocksize]
        s = s + state.offset
    else:
        s = state.absmax
    return codes, s[torch.arange(n, device=packed.device) // state.blocksize]


def formula(packed, state, dtype):
    """The exact recovery order of docs/design.md in torch fp32, from bitsandbytes' own tables."""
    codes, s = codes_and_scales(packed, state)
    levels = bnbF.get_4bit_type("nf4", device=packed.device).float()
    return (levels[codes] * s).to(dtype).reshape(state.shape)


def to(state, device):
    state.to(device)
    return state


def linear4bit(o, i, device):
    lin = bnb.nn.Linear4bit(i, o, bias=False, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(o, i), requires_grad=False, quant_type="nf4")
    return lin.to(device)
