"""The custom ops' Python side: fake (meta) implementations and autograd.

The schemas are declared once, in csrc/torch/library.cpp; importing `_C` loads
them with their CPU and CUDA kernels. Each op's fake function sits here so that
torch.compile can trace through it from metadata alone.
"""
import types

import torch

from . import _C  # noqa: F401  (loads the op library)


class Arguments:
    """An op's arguments by name, read from its own schema (csrc/torch/library.cpp),
    so that no Python code repeats an argument's position."""

    def __init__(self, op):
        self.names = tuple(a.name for a in op._schema.arguments)

    def bind(self, values):
        """Per-argument values (a call's inputs, or ctx.needs_input_grad) by name."""
        values = tuple(values)
        if len(values) != len(self.names):
            raise TypeError(f"expected {len(self.names)} values for {self.names}, got {len(values)}")
        return types.SimpleNamespace(**dict(zip(self.names, values)))

    def gradients(self, **grads):
        """What the op's backward returns: these gradients at their arguments' places, None elsewhere."""
        unknown = set(grads) - set(self.names)
        if unknown:
            raise TypeError(f"no argument named {sorted(unknown)} in {self.names}")
        return tuple(grads.get(name) for name in self.names)


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


_NF4_LINEAR = Arguments(torch.ops.slothai.nf4_linear.default)


def _nf4_linear_setup_context(ctx, inputs, output):
    a = _NF4_LINEAR.bind(inputs)
    ctx.save_for_backward(a.packed, a.absmax, a.code2, a.absmax2, a.offset)
    ctx.meta = dict(blocksize=a.blocksize, blocksize2=a.blocksize2, shape=a.shape, dtype=a.x.dtype)


def _nf4_linear_backward(ctx, grad):
    need = _NF4_LINEAR.bind(ctx.needs_input_grad)
    dx = db = None
    if need.x:
        packed, absmax, code2, absmax2, offset = ctx.saved_tensors
        dx = grad @ _dequant(packed=packed, absmax=absmax, code2=code2, absmax2=absmax2, offset=offset, **ctx.meta)
    if need.bias:
        db = grad.reshape(-1, grad.shape[-1]).sum(0)
    return _NF4_LINEAR.gradients(x=dx, bias=db)


torch.library.register_autograd("slothai::nf4_linear", _nf4_linear_backward,
                                setup_context=_nf4_linear_setup_context)


# --------------------------------------------------------------------------
# slothai::fused_ce — forms exactly the gradients its grad_* flags ask for.
REDUCTIONS = ("mean", "none", "sum")
_fused_ce = torch.ops.slothai.fused_ce.default
_FUSED_CE = Arguments(_fused_ce)
_FUSED_CE_OPTIONS = ("ignore_index", "label_smoothing", "softcap", "z_loss", "reduction", "chunk_size")


@torch.library.register_fake("slothai::fused_ce")
def _fused_ce_fake(*args):
    a = _FUSED_CE.bind(args)
    n, h = a.hidden.shape
    v = a.weight.shape[0]
    loss = a.hidden.new_empty((n,) if a.reduction == "none" else (), dtype=torch.float32)
    dh = a.hidden.new_empty((n, h) if a.grad_hidden else (0, 0))
    dw = a.hidden.new_empty((v, h) if a.grad_weight else (0, 0))
    db = a.hidden.new_empty((v,) if a.grad_bias else (0,))
    return loss, dh, dw, db


def _fused_ce_setup_context(ctx, inputs, output):
    a = _FUSED_CE.bind(inputs)
    ctx.options = {name: getattr(a, name) for name in _FUSED_CE_OPTIONS}
    ctx.formed = (a.grad_hidden, a.grad_weight, a.grad_bias)
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    if a.reduction == "none":  # backward recomputes with per-row factors
        ctx.save_for_backward(a.hidden, a.weight, a.bias, a.target)
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
    need = _FUSED_CE.bind(ctx.needs_input_grad)
    if ctx.options["reduction"] == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        wanted = (need.hidden, need.weight, need.bias and bias is not None)
        _, dh, dw, db = _fused_ce(hidden, weight, bias, target, g_loss.float().reshape(-1), **ctx.options,
                                  grad_hidden=wanted[0], grad_weight=wanted[1], grad_bias=wanted[2])
    else:
        wanted = ctx.formed
        dh, dw, db = (_scaled(t, g_loss) for t in ctx.saved_tensors)
    return _FUSED_CE.gradients(hidden=dh if wanted[0] else None, weight=dw if wanted[1] else None,
                               bias=db if wanted[2] else None)


torch.library.register_autograd("slothai::fused_ce", _fused_ce_backward, setup_context=_fused_ce_setup_context)
