"""slothai::dequant_nf4: bitsandbytes NF4 codes (+ block scales, double-quantized
or not) -> a dense weight, in one kernel launch.

Reads a bitsandbytes `QuantState` by its attributes, so any object with them
works and bitsandbytes itself is never imported.
"""
import functools
import math

import torch

from .. import _C
from . import kernels
from .kernels import check_device, check_dtype, is_pow2
from .library import register_kernel
from .nf4_weight import NF4Weight
from .schema import Arguments

_dequant_nf4 = torch.ops.slothai.dequant_nf4.default
_ARGS = Arguments(_dequant_nf4)


def weight_fields(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape):
    """Checks an NF4 weight's arguments against each other; returns the fields of the
    core's slothai_nf4_args from `packed` to `blocksize2` and the tensors they point
    into (contiguous or fp32 copies where the inputs were not), to be kept until the
    launch. Every message names its argument."""
    numel = math.prod(shape)
    if min(shape, default=0) < 0:
        raise ValueError(f"shape must have non-negative sizes, got {list(shape)}")
    if numel >= 2**63 or (numel == 0 and math.prod([max(d, 1) for d in shape]) >= 2**63):
        raise ValueError(f"shape {list(shape)} has more elements than int64 can count")  # as torch.empty counts
    if not (is_pow2(blocksize) and 32 <= blocksize <= 4096):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    nbytes, need = packed.numel() * packed.element_size(), (numel + 1) // 2
    if nbytes < need:
        raise ValueError(f"packed holds {nbytes} bytes but shape {list(shape)} needs {need}")
    nblocks = -(-numel // blocksize)
    dev = packed.device
    check_device(absmax, dev, "absmax")
    if absmax.numel() < nblocks:
        raise ValueError(f"absmax has {absmax.numel()} scales but shape {list(shape)} with blocksize {blocksize} needs "
                         f"{nblocks}")
    # The kernels read every input as a flat array in logical order: a strided
    # view is copied first (a no-op for the contiguous tensors bitsandbytes makes).
    packed, absmax = packed.contiguous(), absmax.contiguous()
    if absmax.dtype == torch.uint8:  # double quantization: the block scales are codes into code2
        if code2 is None or absmax2 is None or offset is None:
            raise ValueError("absmax is uint8 (double-quantized), so code2, absmax2 and offset are required")
        check_dtype(code2, torch.float32, "code2")
        check_dtype(absmax2, torch.float32, "absmax2")
        # bitsandbytes adds a float16 / bfloat16 offset (some saved checkpoints hold
        # one) to the fp32 scales after widening it, which is exact: do the same.
        if not offset.dtype.is_floating_point:
            raise TypeError(f"offset must be a floating-point tensor, got {kernels.dtype_name(offset.dtype)}")
        for t, name in ((code2, "code2"), (absmax2, "absmax2"), (offset, "offset")):
            check_device(t, dev, name)
        if code2.numel() != 256:
            raise ValueError(f"code2 must have 256 levels, got {code2.numel()}")
        if offset.numel() != 1:
            raise ValueError(f"offset must hold one value, got {offset.numel()}")
        if not (is_pow2(blocksize2) and blocksize2 <= 4096):
            raise ValueError(f"blocksize2 must be a power of two in [1, 4096], got {blocksize2}")
        nblocks2 = -(-nblocks // blocksize2)
        if absmax2.numel() < nblocks2:
            raise ValueError(f"absmax2 has {absmax2.numel()} scales but {nblocks} blocks with blocksize2 "
                             f"{blocksize2} need {nblocks2}")
        if offset.dtype != torch.float32:
            offset = offset.float()
        keep = (packed, absmax, code2.contiguous(), absmax2.contiguous(), offset)
        scales = (absmax.data_ptr(), 0, *(t.data_ptr() for t in keep[2:]))
    else:
        if absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be uint8 or float32, got {kernels.dtype_name(absmax.dtype)}")
        if code2 is not None or absmax2 is not None or offset is not None:
            raise ValueError("absmax is float32 (not double-quantized), so code2, absmax2 and offset must be None")
        keep = (packed, absmax)
        scales = (0, absmax.data_ptr(), 0, 0, 0)
    return (packed.data_ptr(), *scales, numel, blocksize, blocksize2), keep


def _kernel(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    out_dtype = kernels.core_dtype(dtype, "dtype")
    fields, keep = weight_fields(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    kernels.launch(_C.dequant_nf4, packed.device, *fields, out_dtype, out.data_ptr())
    return out


register_kernel("dequant_nf4", _kernel)


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


def weight_args(weight):
    """(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape) of a Params4bit or NF4Weight:
    the weight's arguments of nf4_linear and nf4_matmul."""
    if isinstance(weight, NF4Weight):
        return weight.op_args()
    qs = getattr(weight, "quant_state", None)
    if not isinstance(weight, torch.Tensor) or qs is None:
        raise TypeError(f"weight must be a bitsandbytes Params4bit (with its quant_state) or an NF4Weight, "
                        f"got {type(weight).__name__}")
    check_quant_state(qs)
    return (weight.data, *quant_state_args(qs), list(qs.shape))
