"""The custom ops' Python side: fake (meta) implementations and autograd.

The schemas are declared once, in csrc/torch/library.cpp; importing `_C` loads
them with their CPU and CUDA kernels. Each op's fake function sits here so that
torch.compile can trace through it from metadata alone.
"""
import math

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _C  # noqa: F401  (loads the op library)


@torch.library.register_fake("slothai::dequant_nf4")
def _dequant_nf4_fake(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


# --------------------------------------------------------------------------
# slothai::nf4_linear — backward dequantizes again: only the 4-bit codes are kept.
_dequant = torch.ops.slothai.dequant_nf4.default


@torch.library.register_fake("slothai::nf4_linear")
def _nf4_linear_fake(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias):
    torch._check(len(shape) == 2, lambda: f"shape must be [out_features, in_features], got {shape}")
    torch._check(x.shape[-1] == shape[1], lambda: f"x must end in in_features = {shape[1]}, got {x.shape}")
    return x.new_empty((*x.shape[:-1], shape[0]))


def _nf4_linear_setup_context(ctx, inputs, output):
    x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias = inputs
    ctx.save_for_backward(packed, absmax, code2, absmax2, offset)
    ctx.meta = (blocksize, blocksize2, shape, x.dtype)


def _nf4_linear_backward(ctx, grad):
    dx = db = None
    if ctx.needs_input_grad[0]:
        dx = grad @ _dequant(*ctx.saved_tensors, *ctx.meta)
    if ctx.needs_input_grad[9]:
        db = grad.reshape(-1, grad.shape[-1]).sum(0)
    return (dx,) + (None,) * 8 + (db,)


torch.library.register_autograd("slothai::nf4_linear", _nf4_linear_backward,
                                setup_context=_nf4_linear_setup_context)


# FLOP counts, for torch.utils.flop_counter and for the AOT partitioner, whose
# activation-memory budget ranks what to recompute by FLOPs: an op without a
# formula counts as free, and the base-weight GEMM would be recomputed in backward.
@register_flop_formula(torch.ops.slothai.nf4_linear)
def _nf4_linear_flops(x_shape, *args, out_shape=None, **kwargs):
    return 2 * math.prod(out_shape) * x_shape[-1]


# --------------------------------------------------------------------------
# slothai::fused_ce — reduction codes as the schema takes them.
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def _fused_ce_wants_grad(bias, grad_rows, reduction, grad_hidden, grad_weight, grad_bias):
    return grad_rows is not None or (
        reduction != 0 and (grad_hidden or grad_weight or (grad_bias and bias is not None)))


@torch.library.register_fake("slothai::fused_ce")
def _fused_ce_fake(hidden, weight, bias, target, grad_rows, ignore_index, label_smoothing, softcap, z_loss,
                   reduction, chunk_size, grad_hidden, grad_weight, grad_bias):
    n, h = hidden.shape
    v = weight.shape[0]
    g = _fused_ce_wants_grad(bias, grad_rows, reduction, grad_hidden, grad_weight, grad_bias)
    loss = hidden.new_empty((n,) if reduction == 0 else (), dtype=torch.float32)
    dh = hidden.new_empty((n, h) if g and grad_hidden else (0, 0))
    dw = hidden.new_empty((v, h) if g and grad_weight else (0, 0))
    db = hidden.new_empty((v,) if g and grad_bias and bias is not None else (0,))
    return loss, dh, dw, db


def _fused_ce_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, _, *options = inputs
    ctx.options = options  # ignore_index ... grad_bias, passed on unchanged
    ctx.has_bias = bias is not None
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    if options[4] == 0:  # reduction none: backward recomputes with per-row factors
        ctx.save_for_backward(hidden, weight, bias, target)
    else:  # sum / mean: the forward already formed the gradients for an upstream 1
        ctx.save_for_backward(dh, dw, db)


def _scaled(t, g, slab=1 << 24):
    """t * g with the product formed in fp32 and rounded once (g is an fp32 scalar
    tensor: casting it to bf16 first would scale every gradient by up to 2^-9),
    a slab at a time so no full fp32 copy of t (dW can be 1 GB) ever exists."""
    if not isinstance(t.numel(), int):  # traced with symbolic sizes: one expression, which inductor fuses
        return (t.float() * g).to(t.dtype)
    if t.dtype == torch.float32 or t.numel() == 0:
        return t * g
    out = torch.empty_like(t)
    flat_in, flat_out = t.view(-1), out.view(-1)
    for start in range(0, t.numel(), slab):
        flat_out[start:start + slab] = (flat_in[start:start + slab].float() * g).to(t.dtype)
    return out


def _fused_ce_backward(ctx, g_loss, _dh, _dw, _db):
    *_, grad_hidden, grad_weight, grad_bias = ctx.options
    if ctx.options[4] == 0:
        hidden, weight, bias, target = ctx.saved_tensors
        _, dh, dw, db = torch.ops.slothai.fused_ce(hidden, weight, bias, target, g_loss.float().reshape(-1),
                                                   *ctx.options)
    else:
        dh, dw, db = (_scaled(t, g_loss) for t in ctx.saved_tensors)
    return (dh if grad_hidden else None, dw if grad_weight else None,
            db if grad_bias and ctx.has_bias else None) + (None,) * 11


torch.library.register_autograd("slothai::fused_ce", _fused_ce_backward, setup_context=_fused_ce_setup_context)
