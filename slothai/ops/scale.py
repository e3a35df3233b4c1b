"""slothai::scale_: x *= factor in place, the product formed in fp32 and rounded
once into x's dtype, with the factor a one-value fp32 tensor read on x's device
(formula: slothai_scale_cpu in csrc/core/slothai.h).

torch's own `x.mul_(factor)` on CUDA first rounds an fp32 factor to a bf16 / fp16
x's dtype (up to 2^-8 off in bf16), and `(x.float() * factor).to(x.dtype)` holds
an fp32 copy of x; fused_ce's backward scales gradients of up to a GB with this.
An element that is exactly 0 stays 0 whatever the factor (inf and NaN included):
a gradient row with no contribution stays 0, as torch's cross-entropy leaves it.
"""
import torch

from .. import _C
from . import kernels
from .library import register_kernel


def _kernel(x, factor):
    dtype = kernels.core_dtype(x.dtype, "self")
    if not x.is_contiguous():
        raise ValueError("self must be contiguous (it is scaled in place)")
    kernels.check_device(factor, x.device, "factor")
    kernels.check_dtype(factor, torch.float32, "factor")
    if factor.numel() != 1:
        raise ValueError(f"factor must hold one value, got {factor.numel()}")
    kernels.launch(_C.scale, x.device, x.data_ptr(), dtype, x.numel(), factor.data_ptr())


register_kernel("scale_", _kernel)


@torch.library.register_fake("slothai::scale_")
def _fake(x, factor):
    return None


def scale_(x, factor):
    """x *= factor in place (x contiguous fp32 / fp16 / bf16; factor: one fp32 value on x's device); returns x."""
    torch.ops.slothai.scale_.default(x, factor)
    return x
