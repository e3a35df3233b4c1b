"""The custom ops' Python side: fake (meta) implementations and autograd.

The schemas are declared once, in csrc/torch/library.cpp; importing `_C` loads
them with their CPU and CUDA kernels. Each op's fake function sits here so that
torch.compile can trace through it from metadata alone.
"""
import torch

from . import _C  # noqa: F401  (loads the op library)


@torch.library.register_fake("slothai::dequant_nf4")
def _dequant_nf4_fake(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)
