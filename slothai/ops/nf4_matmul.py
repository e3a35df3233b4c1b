"""slothai::nf4_matmul: nf4_linear's product (same schema, fake and autograd:
nf4_linear.py) with the weight read 4-bit straight into it and nothing of W
written -- bound by the codes' bytes for a few rows of x, the decode shapes.
nf4_linear on CUDA calls this kernel itself for up to a few rows; call the op to
force the 4-bit route at any size. Here too: the argument checks both ops share.
"""
import torch

from .. import _C
from . import kernels
from .dequant_nf4 import weight_args, weight_fields
from .kernels import check_device, check_dtype, ptr
from .library import register_kernel

_nf4_matmul = torch.ops.slothai.nf4_matmul.default


def low_rank_dtype(x_dtype, lora_x_dtype):
    """The dtype lora_x and lora_b must have: x's, or fp32 (both) over fp16 / bf16 x
    (PEFT's fp32 adapters, whose term the kernels form in fp32)."""
    return torch.float32 if lora_x_dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16) else x_dtype


def check_linear_args(x, packed, shape, bias, lora_x, lora_b):
    """x against the weight's [out_features, in_features] shape, the bias, and the
    low-rank pair (lora_x [..., r] with x's leading dims, lora_b [out_features, r], both
    in x's dtype or both fp32 over fp16 / bf16 x): dtypes, devices and sizes, each
    message naming its argument."""
    if len(shape) != 2:
        raise ValueError(f"shape must be [out_features, in_features], got {list(shape)}")
    if x.dim() < 1 or x.shape[-1] != shape[1]:
        raise ValueError(f"x must end in in_features = {shape[1]}, got shape {list(x.shape)}")
    kernels.core_dtype(x.dtype, "x")
    check_device(packed, x.device, "packed")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != shape[0]:
            raise ValueError(f"bias must have shape [{shape[0]}], got {list(bias.shape)}")
        check_dtype(bias, x.dtype, "bias")
        check_device(bias, x.device, "bias")
    if (lora_x is None) != (lora_b is None):
        raise ValueError(f"lora_x and lora_b must be given together, got {'lora_b' if lora_x is None else 'lora_x'} "
                         f"alone")
    if lora_x is not None:
        low = low_rank_dtype(x.dtype, lora_x.dtype)
        for t, name in ((lora_x, "lora_x"), (lora_b, "lora_b")):
            check_dtype(t, low, name)
            check_device(t, x.device, name)
        if lora_b.dim() != 2 or lora_b.shape[0] != shape[0]:
            raise ValueError(f"lora_b must have shape [{shape[0]}, r], got {list(lora_b.shape)}")
        if lora_x.shape[:-1] != x.shape[:-1] or lora_x.shape[-1] != lora_b.shape[1]:
            raise ValueError(f"lora_x must have x's leading dims and end in r = {lora_b.shape[1]}, got shape "
                             f"{list(lora_x.shape)} for x of shape {list(x.shape)}")


def product_fields(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias, lora_x=None,
                   lora_b=None, lora_scale=1.0):
    """One product's fields of the core's slothai_nf4_matmul_args (csrc/module.c's
    order), its output, and the tensors the fields point into (kept until the launch).
    x must already be contiguous; the arguments checked (check_linear_args)."""
    fields, keep = weight_fields(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape)
    n, k = shape
    bias = None if bias is None else bias.contiguous()
    lora_x = None if lora_x is None else lora_x.contiguous()
    lora_b = None if lora_b is None else lora_b.contiguous()
    out = x.new_empty((*x.shape[:-1], n))
    fields = (*fields, kernels.DTYPES[x.dtype], kernels.rows_of(x), n, k, 0 if lora_b is None else lora_b.shape[1],
              x.data_ptr(), ptr(bias), ptr(lora_x), ptr(lora_b), out.data_ptr(), float(lora_scale),
              kernels.DTYPES[x.dtype if lora_x is None else lora_x.dtype])
    return fields, out, (keep, bias, lora_x, lora_b)


def matmul_kernel(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias, lora_x=None,
                  lora_b=None, lora_scale=1.0, *, checked=False):
    """The op's kernel (CPU and CUDA): one call of slothai_nf4_matmul (csrc/core/slothai.h)."""
    if not checked:
        check_linear_args(x, packed, shape, bias, lora_x, lora_b)
    fields, out, _keep = product_fields(x.contiguous(), packed, absmax, code2, absmax2, offset, blocksize,
                                        blocksize2, shape, bias, lora_x, lora_b, lora_scale)
    kernels.launch(_C.nf4_matmul, x.device, *fields)
    return out


register_kernel("nf4_matmul", matmul_kernel)


def nf4_matmul(x, weight, bias=None, *, lora_x=None, lora_b=None, lora_scale=1.0):
    """`slothai.nf4_linear` with the weight read 4-bit straight into the product,
    whatever the number of rows of x. Each 4-bit level enters the product as a
    value of x's dtype and its block scale multiplies the fp32 partial sum of its
    block (csrc/core/slothai.h has the contract); fp32 x, K not a multiple of 64
    and cards before sm_80 take a generic kernel."""
    return _nf4_matmul(x, *weight_args(weight), bias, lora_x, lora_b, lora_scale)
