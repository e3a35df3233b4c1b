"""slothai::nf4_matmul: nf4_linear's product (same schema, checks, fake and
autograd: nf4_linear.py) with the weight read 4-bit straight into it and nothing
of W written -- bound by the codes' bytes for a few rows of x, the decode shapes.
nf4_linear on CUDA calls it itself for up to a few rows (csrc/torch/nf4_linear.cpp);
call it to force the 4-bit route at any size.
"""
import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _C  # noqa: F401  (loads the op library)
from .nf4_linear import _ARGS, _backward, _fake, _flops, _setup_context, weight_args
from .schema import Arguments

_nf4_matmul = torch.ops.slothai.nf4_matmul.default
assert Arguments(_nf4_matmul).names == _ARGS.names  # one schema, declared twice (library.cpp)

torch.library.register_fake("slothai::nf4_matmul")(_fake)
torch.library.register_autograd("slothai::nf4_matmul", _backward, setup_context=_setup_context)
register_flop_formula(torch.ops.slothai.nf4_matmul)(_flops)


def nf4_matmul(x, weight, bias=None, *, lora_x=None, lora_b=None):
    """`slothai.nf4_linear` with the weight read 4-bit straight into the product,
    whatever the number of rows of x. Each 4-bit level enters the product as a
    value of x's dtype and its block scale multiplies the fp32 partial sum of its
    block (csrc/core/slothai.h has the contract); fp32 x, K not a multiple of 64
    and cards before sm_80 take a generic kernel."""
    return _nf4_matmul(x, *weight_args(weight), bias, lora_x, lora_b)
