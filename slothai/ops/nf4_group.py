"""slothai::nf4_linear_group: nf4_linear for several NF4 weights that share their x
(a decoder layer's q/k/v, or gate/up, at a decode step), one output per weight:

    out[i] = x @ dequant(W_i).T (+ bias_i) (+ lora_scale_i * lora_x_i @ lora_b_i.T)

On CUDA, for a few rows of x (nf4_linear.FOUR_BIT_ROWS) in fp16 / bf16, one launch
of the 4-bit decode kernel computes every product (slothai_nf4_matmul_group_cuda):
a decode step pays one launch's fixed cost for q/k/v instead of three, and the three
weights' tiles fill one grid. Each output is what nf4_linear gives for its weight
(the same kernel, the same sums); anywhere else each product is nf4_linear's own.

Made by the decode step's graph pass (slothai/generation/grouping.py) in no-grad
graphs, so it has no backward: called on inputs that require grad, with grad mode
on, it raises (use nf4_linear per weight there).
"""
import torch
from torch.utils._pytree import tree_leaves

from .. import _C
from . import kernels
from .dequant_nf4 import weight_args
from .library import LIB, register_kernel
from .nf4_linear import FOUR_BIT_ROWS
from .nf4_linear import _kernel as linear_kernel
from .nf4_matmul import check_linear_args, product_fields

_group = torch.ops.slothai.nf4_linear_group.default

# The most products one launch takes (csrc/core/slothai.h, SLOTHAI_NF4_GROUP_MAX).
GROUP_MAX = _C.NF4_GROUP_MAX

# The per-weight list arguments, in schema order.
_LISTS = ("packed", "absmax", "code2", "absmax2", "offset", "blocksize", "blocksize2", "bias", "lora_x", "lora_b",
          "lora_scale")


def _products(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shapes, bias, lora_x, lora_b,
              lora_scale):
    """Each weight's nf4_linear arguments past x; ValueError naming the list whose length does not fit."""
    count = len(packed)
    if not 1 <= count <= GROUP_MAX:
        raise ValueError(f"packed must hold 1 to {GROUP_MAX} weights, got {count}")
    lists = dict(zip(_LISTS, (packed, absmax, code2, absmax2, offset, blocksize, blocksize2, bias, lora_x, lora_b,
                              lora_scale)))
    for name, values in lists.items():
        if len(values) != count:
            raise ValueError(f"{name} must hold one entry per weight ({count}), got {len(values)}")
    if len(shapes) != 2 * count:
        raise ValueError(f"shapes must hold [out_features, in_features] of each weight ({2 * count} sizes), got "
                         f"{len(shapes)}")
    return [(packed[i], absmax[i], code2[i], absmax2[i], offset[i], blocksize[i], blocksize2[i],
             list(shapes[2 * i:2 * i + 2]), bias[i], lora_x[i], lora_b[i], lora_scale[i]) for i in range(count)]


def _kernel(x, *lists):
    products = _products(x, *lists)
    if not (x.is_cuda and x.dtype != torch.float32 and kernels.rows_of(x) <= FOUR_BIT_ROWS and len(products) > 1):
        return [linear_kernel(x, *p) for p in products]  # (each checks its arguments)
    for p in products:
        check_linear_args(x, p[0], p[7], *p[8:11])
    x = x.contiguous()
    launches = [product_fields(x, *p) for p in products]
    kernels.launch(_C.nf4_matmul_group, x.device, *(fields for fields, _, _ in launches))
    return [out for _, out, _ in launches]


register_kernel("nf4_linear_group", _kernel)


@torch.library.register_fake("slothai::nf4_linear_group")
def _fake(x, packed, *lists):
    shapes = lists[6]
    torch._check(len(shapes) == 2 * len(packed), lambda: f"shapes must hold 2 sizes per weight, got {len(shapes)}")
    for i in range(len(packed)):
        torch._check(x.shape[-1] == shapes[2 * i + 1],
                     lambda: f"x must end in in_features = {shapes[2 * i + 1]}, got {x.shape}")
    return [x.new_empty((*x.shape[:-1], shapes[2 * i])) for i in range(len(packed))]


def _autograd(keyset, *args):
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(args)):
        raise RuntimeError("slothai::nf4_linear_group has no backward (it serves no-grad decode steps); an input "
                           "requires grad: call slothai.nf4_linear per weight, or run under torch.no_grad()")
    with torch._C._AutoDispatchBelowAutograd():
        return _group.redispatch(keyset & torch._C._after_autograd_keyset, *args)


LIB.impl("nf4_linear_group", _autograd, "Autograd", with_keyset=True)


def nf4_linear_group(x, weights, bias=None, *, lora_x=None, lora_b=None, lora_scale=None):
    """[slothai.nf4_linear(x, w, b, lora_x=lx, lora_b=lb, lora_scale=s) for each weight],
    1 to 3 weights sharing x, no gradients: on CUDA one launch of the 4-bit kernel for a
    few rows of x. bias, lora_x, lora_b, lora_scale: one entry per weight (None: none)."""
    count = len(weights)

    def fill(values, default):
        return [default] * count if values is None else list(values)

    args = [weight_args(w) for w in weights]
    shapes = [size for a in args for size in a[7]]
    return _group(x, *(list(column) for column in zip(*(a[:7] for a in args))), shapes, fill(bias, None),
                  fill(lora_x, None), fill(lora_b, None), fill(lora_scale, 1.0))
