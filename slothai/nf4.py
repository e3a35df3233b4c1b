"""NF4 dequantization of bitsandbytes weights through `slothai::dequant_nf4`.

Reads a bitsandbytes `QuantState` by its attributes, so any object with them
works and bitsandbytes itself is never imported.
"""
import functools

import torch

from . import ops  # noqa: F401  (registers the op)

_dequant_nf4 = torch.ops.slothai.dequant_nf4.default


def dequantize_nf4(weight, quant_state=None, *, dtype=None):
    """Dequantize NF4 codes to a dense, contiguous weight of `quant_state.shape`.

    weight: a bitsandbytes `Params4bit` (carrying `.quant_state`), or the packed
        codes (uint8 or any storage dtype, read as bytes) with `quant_state` given.
    dtype: output dtype (float16, bfloat16, float32); default `quant_state.dtype`.

    Bit-identical to `bitsandbytes.functional.dequantize_4bit`, in one kernel
    launch on CUDA (both levels of double quantization included).
    """
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise TypeError("weight has no .quant_state: pass a bitsandbytes Params4bit, or (packed, quant_state)")
    quant_type = getattr(quant_state, "quant_type", "nf4")
    if quant_type != "nf4":
        raise ValueError(f"quant_state.quant_type must be 'nf4', got {quant_type!r}")
    dtype = quant_state.dtype if dtype is None else dtype
    if getattr(quant_state, "nested", False):
        state2 = quant_state.state2
        code2, absmax2, offset, blocksize2 = state2.code, state2.absmax, quant_state.offset, state2.blocksize
    else:
        code2 = absmax2 = offset = None
        blocksize2 = 256
    if isinstance(weight, torch.nn.Parameter):
        weight = weight.data  # a Params4bit's bytes; the op does not differentiate through codes
    return _dequant_nf4(
        weight, quant_state.absmax, code2, absmax2, offset,
        quant_state.blocksize, blocksize2, list(quant_state.shape), dtype,
    )


@functools.lru_cache(maxsize=None)
def _nf4_levels():
    # The 16 levels, read back from the kernel's own table (csrc/core/slothai.h)
    # by dequantizing the codes 0..15 with a unit scale.
    packed = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8)
    return _dequant_nf4(
        packed, torch.ones(1), None, None, None, 64, 256, [16], torch.float32
    )


def nf4_levels():
    """The 16 NF4 levels (float32, index 0..15) as the kernels use them."""
    return _nf4_levels().clone()
