"""slothai::nf4_linear: `x @ dequant_nf4(...).T + bias`, the weight dequantized in
x's dtype into a temporary, plus optionally a low-rank term
`lora_scale * lora_x @ lora_b.T` that the base GEMM accumulates onto (LoRA:
lora_x = A(dropout(x)), lora_b = B, lora_scale = alpha / r). The factor rides in
the GEMM's alpha and the 4-bit kernels' fp32 sum, so no pass scales A(x): under
torch.compile that pass was a kernel of its own per projection, the op being opaque
to fusion. Backward dequantizes again, so only the 4-bit codes are kept; being one
op, torch.compile cannot merge the forward's and the backward's dequantization and
save the dense weight instead.

With the low-rank term the kernel forms
    y = s lora_x lora_b^T (+ b)      a K = r GEMM writes y            (rows x out)
    y += x W^T                       the base GEMM accumulates (beta = 1)
Traffic in rows x out passes: two writes and one read, that read in the base
GEMM's epilogue. Done apart (base, LoRA term, then their sum) it is three writes
and two reads. Measured (H100, Llama-3.1-8B shape, a training step): 10.5 ms less
GPU work, though the epilogue's read is not free (docs/design.md). Rounding: the
LoRA term (scaled) once into x's dtype, then the sum once.

On CUDA, for a few rows of x (FOUR_BIT_ROWS), the kernel reads the weight 4-bit
instead (slothai::nf4_matmul's kernel, nf4_matmul.py); the fake, autograd and
FLOPs here serve both ops.

    d x      = dy W             d bias   = sum of dy over rows
    d lora_x = s dy lora_b      d lora_b = s dy^T lora_x
"""
import math

import torch
from torch.utils.flop_counter import register_flop_formula

from . import dequant_nf4, kernels
from .dequant_nf4 import weight_args
from .library import register_autograd, register_kernel
from .nf4_matmul import check_linear_args, low_rank_dtype, matmul_kernel
from .schema import Arguments

_nf4_linear = torch.ops.slothai.nf4_linear.default
_dequant_nf4 = torch.ops.slothai.dequant_nf4.default
_ARGS = Arguments(_nf4_linear)
assert Arguments(torch.ops.slothai.nf4_matmul.default).names == _ARGS.names  # one schema (library.py)

# Up to this many rows of x, nf4_linear on CUDA reads the weight 4-bit
# (nf4_matmul: bound by the codes' bytes, ~0.52 a weight) instead of
# dequantizing it (~4.5 bytes a weight moved, then a GEMM that wins on
# arithmetic for more rows). Measured on an H200: benchmarks/results/nf4_matmul_first.json
# (the first kernel: 16 rows 174 us against 306 for the 8B layer, 64 rows 385 against 305), and
# on an H100 with today's kernels: benchmarks/results/nf4_matmul.json (the 8B layer 139 us against
# 384 at 16 rows, 395 against 376 at 32; the 1B layer 74 against 120, 151 against 122). Hopper
# only: no other card generation has been measured (before sm_80 the generic kernel runs).
FOUR_BIT_ROWS = 16


def _kernel(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias, lora_x=None, lora_b=None,
            lora_scale=1.0):
    check_linear_args(x, packed, shape, bias, lora_x, lora_b)
    rows = kernels.rows_of(x)
    if x.is_cuda and x.dtype != torch.float32 and rows <= FOUR_BIT_ROWS:
        return matmul_kernel(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias, lora_x,
                             lora_b, lora_scale, checked=True)
    w = dequant_nf4._kernel(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, x.dtype)
    if lora_x is None:
        return torch.nn.functional.linear(x, w, bias)
    lx = lora_x.reshape(rows, lora_x.shape[-1])
    if lx.dtype != x.dtype:  # fp32 low-rank operands over fp16 / bf16 x: the term in fp32, added to the base's result
        y = torch.nn.functional.linear(x.reshape(rows, x.shape[-1]), w, bias)
        return y.float().addmm_(lx, lora_b.t(), alpha=lora_scale).to(x.dtype).view(*x.shape[:-1], w.shape[0])
    if bias is None:  # beta = 0: the empty output is not read
        y = x.new_empty((rows, shape[0])).addmm_(lx, lora_b.t(), beta=0, alpha=lora_scale)
    else:
        y = torch.addmm(bias, lx, lora_b.t(), alpha=lora_scale)
    y.addmm_(x.reshape(rows, x.shape[-1]), w.t())
    return y.view(*x.shape[:-1], w.shape[0])


register_kernel("nf4_linear", _kernel)


def _fake(*args):
    a = _ARGS.bind(args)
    torch._check(len(a.shape) == 2, lambda: f"shape must be [out_features, in_features], got {a.shape}")
    torch._check(a.x.shape[-1] == a.shape[1], lambda: f"x must end in in_features = {a.shape[1]}, got {a.x.shape}")
    torch._check_value((a.lora_x is None) == (a.lora_b is None), lambda: "lora_x and lora_b must be given together")
    if a.lora_x is not None:
        low = low_rank_dtype(a.x.dtype, a.lora_x.dtype)
        for name in ("lora_x", "lora_b"):
            t = getattr(a, name)
            torch._check_type(t.dtype == low, lambda: f"{name} must be {low}, got {t.dtype}")
        torch._check_value(a.lora_b.dim() == 2 and a.lora_b.shape[0] == a.shape[0],
                           lambda: f"lora_b must have shape [{a.shape[0]}, r], got {a.lora_b.shape}")
        torch._check_value(a.lora_x.shape[:-1] == a.x.shape[:-1] and a.lora_x.shape[-1] == a.lora_b.shape[1],
                           lambda: f"lora_x must have x's leading dims and end in r = {a.lora_b.shape[1]}, "
                                   f"got shape {a.lora_x.shape} for x of shape {a.x.shape}")
    return a.x.new_empty((*a.x.shape[:-1], a.shape[0]))


def _setup_context(ctx, inputs, output):
    a = _ARGS.bind(inputs)
    ctx.save_for_backward(a.packed, a.absmax, a.code2, a.absmax2, a.offset, a.lora_x, a.lora_b)
    ctx.meta = dict(blocksize=a.blocksize, blocksize2=a.blocksize2, shape=a.shape, dtype=a.x.dtype)
    ctx.lora_scale = a.lora_scale


def _backward(ctx, grad):
    need = _ARGS.bind(ctx.needs_input_grad)
    packed, absmax, code2, absmax2, offset, lora_x, lora_b = ctx.saved_tensors
    dx = db = dlx = dlb = None
    if need.x:
        dx = grad @ _dequant_nf4(packed=packed, absmax=absmax, code2=code2, absmax2=absmax2, offset=offset,
                                 **ctx.meta)
    n = math.prod(grad.shape[:-1])  # explicit: reshape(-1, 0) cannot infer it (rank 0, or no output features)
    rows = grad.reshape(n, grad.shape[-1])
    if need.bias:
        db = rows.sum(0)
    s = ctx.lora_scale  # on [rows, r] and [out, r]: r columns, not a pass over the output
    if lora_x is not None and lora_x.dtype != grad.dtype:  # fp32 low-rank operands: their gradients in fp32
        grad, rows = grad.to(lora_x.dtype), rows.to(lora_x.dtype)
    if need.lora_x:
        dlx = grad @ lora_b if s == 1.0 else (grad @ lora_b).mul_(s)
    if need.lora_b:
        dlb = rows.t() @ lora_x.reshape(n, lora_x.shape[-1])
        dlb = dlb if s == 1.0 else dlb.mul_(s)
    return _ARGS.gradients(x=dx, bias=db, lora_x=dlx, lora_b=dlb)


# FLOP count, for torch.utils.flop_counter and for the AOT partitioner, whose
# activation-memory budget ranks what to recompute by FLOPs: an op without a
# formula counts as free, and the base-weight GEMM would be recomputed in backward.
def _flops(x_shape, *args, out_shape=None, **kwargs):
    lora_b = {**dict(zip(_ARGS.names, (x_shape, *args))), **kwargs}.get("lora_b")  # a shape, as every tensor here
    rank = lora_b[1] if lora_b is not None else 0
    return 2 * math.prod(out_shape) * (x_shape[-1] + rank)


def nf4_linear(x, weight, bias=None, *, lora_x=None, lora_b=None, lora_scale=1.0):
    """`x @ dequantize_nf4(weight).T + bias (+ lora_scale * lora_x @ lora_b.T)` for a
    bitsandbytes Params4bit, in x's dtype, differentiable in x, bias, lora_x and
    lora_b; backward dequantizes again instead of keeping the dense weight.
    `weight` may also be the `NF4Weight` slothai.patch makes of a Params4bit
    (shardable by FSDP2). lora_x [..., r] (x's leading dims) and lora_b
    [out_features, r], both in x's dtype: a low-rank term the base GEMM
    accumulates onto, written once with it (a LoRA layer passes A(dropout(x)), B and its
    scaling as lora_scale, applied in fp32: no pass over A(x) to scale it).
    On CUDA, for a few rows of x, the weight is read 4-bit instead (nf4_matmul)."""
    return _nf4_linear(x, *weight_args(weight), bias, lora_x, lora_b, lora_scale)


for _op in ("nf4_linear", "nf4_matmul"):  # one schema, one fake, one autograd, one FLOP count
    torch.library.register_fake(f"slothai::{_op}")(_fake)
    register_autograd(_op, _backward, setup_context=_setup_context)
    register_flop_formula(getattr(torch.ops.slothai, _op))(_flops)
