"""slothai::nf4_linear: `x @ dequant_nf4(...).T + bias`, the weight dequantized in
x's dtype into a temporary. Backward dequantizes again, so only the 4-bit codes
are kept; being one op, torch.compile cannot merge the forward's and the
backward's dequantization and save the dense weight instead."""
import math

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _C  # noqa: F401  (loads the op library)
from .dequant_nf4 import check_quant_state, quant_state_args
from ..nf4_weight import NF4Weight
from .schema import Arguments

_nf4_linear = torch.ops.slothai.nf4_linear.default
_dequant_nf4 = torch.ops.slothai.dequant_nf4.default
_ARGS = Arguments(_nf4_linear)


@torch.library.register_fake("slothai::nf4_linear")
def _fake(*args):
    a = _ARGS.bind(args)
    torch._check(len(a.shape) == 2, lambda: f"shape must be [out_features, in_features], got {a.shape}")
    torch._check(a.x.shape[-1] == a.shape[1], lambda: f"x must end in in_features = {a.shape[1]}, got {a.x.shape}")
    return a.x.new_empty((*a.x.shape[:-1], a.shape[0]))


def _setup_context(ctx, inputs, output):
    a = _ARGS.bind(inputs)
    ctx.save_for_backward(a.packed, a.absmax, a.code2, a.absmax2, a.offset)
    ctx.meta = dict(blocksize=a.blocksize, blocksize2=a.blocksize2, shape=a.shape, dtype=a.x.dtype)


def _backward(ctx, grad):
    need = _ARGS.bind(ctx.needs_input_grad)
    dx = db = None
    if need.x:
        packed, absmax, code2, absmax2, offset = ctx.saved_tensors
        dx = grad @ _dequant_nf4(packed=packed, absmax=absmax, code2=code2, absmax2=absmax2, offset=offset,
                                 **ctx.meta)
    if need.bias:
        db = grad.reshape(-1, grad.shape[-1]).sum(0)
    return _ARGS.gradients(x=dx, bias=db)


torch.library.register_autograd("slothai::nf4_linear", _backward, setup_context=_setup_context)


# FLOP count, for torch.utils.flop_counter and for the AOT partitioner, whose
# activation-memory budget ranks what to recompute by FLOPs: an op without a
# formula counts as free, and the base-weight GEMM would be recomputed in backward.
@register_flop_formula(torch.ops.slothai.nf4_linear)
def _flops(x_shape, *args, out_shape=None, **kwargs):
    return 2 * math.prod(out_shape) * x_shape[-1]


def nf4_linear(x, weight, bias=None):
    """`x @ dequantize_nf4(weight).T + bias` for a bitsandbytes Params4bit, in x's
    dtype, differentiable in x and bias; backward dequantizes again instead of
    keeping the dense weight. `weight` may also be the `NF4Weight` slothai.patch
    makes of a Params4bit (shardable by FSDP2)."""
    if isinstance(weight, NF4Weight):
        return _nf4_linear(x, *weight.op_args(), bias)
    qs = weight.quant_state
    check_quant_state(qs)
    return _nf4_linear(x, weight.data, *quant_state_args(qs), list(qs.shape), bias)
