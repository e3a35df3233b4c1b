"""slothai::dequant_nf4: bitsandbytes NF4 codes (+ block scales, double-quantized
or not) -> a dense weight, in one kernel launch.

Reads a bitsandbytes `QuantState` by its attributes, so any object with them
works and bitsandbytes itself is never imported.
"""
import functools

import torch

from .. import _C  # noqa: F401  (loads the op library)
from .nf4_weight import NF4Weight
from .schema import Arguments

_dequant_nf4 = torch.ops.slothai.dequant_nf4.default
_ARGS = Arguments(_dequant_nf4)


@torch.library.register_fake("slothai::dequant_nf4")
def _fake(*args):
    a = _ARGS.bind(args)
    return a.packed.new_empty(a.shape, dtype=a.dtype)


def dequantize_nf4(weight, quant_state=None, *, dtype=None):
    """Dequantize NF4 codes to a dense, contiguous weight of `quant_state.shape`.

    weight: a bitsandbytes `Params4bit` (carrying `.quant_state`), or the packed
        codes (uint8 or any storage dtype, read as bytes) with `quant_state` given.
    dtype: output dtype (float16, bfloat16, float32); default `quant_state.dtype`.

    Bit-identical to `bitsandbytes.functional.dequantize_4bit`, in one kernel
    launch on CUDA (both levels of double quantization included).
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float16, torch.bfloat16 or torch.float32) or None, "
                        f"got {type(dtype).__name__} {dtype!r}")
    if quant_state is None and isinstance(weight, NF4Weight):  # slothai.patch's form of a Params4bit
        *args, shape = weight.op_args()
        return _dequant_nf4(weight.codes, *args[1:], shape, weight.compute_dtype if dtype is None else dtype)
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise TypeError("weight has no .quant_state: pass a bitsandbytes Params4bit, or (packed, quant_state)")
    check_quant_state(quant_state)
    dtype = quant_state.dtype if dtype is None else dtype  # a torch.dtype: check_quant_state saw to it
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a Params4bit or a tensor of packed NF4 codes, got {type(weight).__name__}")
    if isinstance(weight, torch.nn.Parameter):
        weight = weight.data  # a Params4bit's bytes; the op does not differentiate through codes
    return _dequant_nf4(weight, *quant_state_args(quant_state), list(quant_state.shape), dtype)


@functools.lru_cache(maxsize=None)
def _nf4_levels():
    # The 16 levels, read back from the kernel's own table (csrc/core/slothai.h)
    # by dequantizing the codes 0..15 with a unit scale.
    packed = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8)
    return _dequant_nf4(packed, torch.ones(1), None, None, None, 64, 256, [16], torch.float32)


def nf4_levels():
    """The 16 NF4 levels (float32, index 0..15) as the kernels use them."""
    return _nf4_levels().clone()


def _check_field(obj, label, name, want, what):
    """Raises TypeError naming <label>.<name> unless obj.<name> is an instance of `want`."""
    value = getattr(obj, name, None)
    if not isinstance(value, want) or isinstance(value, bool):
        shown = f" {value!r}" if isinstance(value, (int, float, str)) else ""
        raise TypeError(f"{label}.{name} must be {what}, got {type(value).__name__}{shown}")


def check_quant_state(qs):
    """Raises TypeError for an object that is not a QuantState (the attributes the
    kernels read, each of its type) and ValueError for a QuantState they cannot read."""
    if not all(hasattr(qs, name) for name in ("absmax", "blocksize", "shape", "dtype")):
        raise TypeError(f"quant_state must be a bitsandbytes QuantState (absmax, blocksize, shape, dtype, ...), "
                        f"got {type(qs).__name__}")
    _check_field(qs, "quant_state", "absmax", torch.Tensor, "a tensor")
    _check_field(qs, "quant_state", "blocksize", int, "an int")
    _check_field(qs, "quant_state", "dtype", torch.dtype, "a torch.dtype")
    shape = qs.shape
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TypeError(f"quant_state.shape must be a sequence of ints, got {shape!r}")
    if getattr(qs, "nested", False):
        _check_field(qs, "quant_state", "offset", torch.Tensor, "a tensor (one value) when nested")
        s2 = getattr(qs, "state2", None)
        if s2 is None:
            raise TypeError("quant_state is nested but has no state2 (the nested QuantState)")
        _check_field(s2, "quant_state.state2", "code", torch.Tensor, "a tensor")
        _check_field(s2, "quant_state.state2", "absmax", torch.Tensor, "a tensor")
        _check_field(s2, "quant_state.state2", "blocksize", int, "an int")
    quant_type = getattr(qs, "quant_type", "nf4")
    if quant_type != "nf4":
        raise ValueError(f"quant_state.quant_type must be 'nf4', got {quant_type!r}")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("quant_state is in bitsandbytes' CPU inference layout (packing_format_for_cpu); "
                         "slothai.patch converts it back, or call the module in training mode")


def quant_state_args(qs):
    """The op's arguments from `absmax` to `blocksize2` (between `packed` and
    `shape`, in schema order), read off a QuantState; nf4_linear takes them too."""
    if getattr(qs, "nested", False):
        s2 = qs.state2
        return (qs.absmax, s2.code, s2.absmax, qs.offset, qs.blocksize, s2.blocksize)
    return (qs.absmax, None, None, None, qs.blocksize, 256)
