"""slothai's custom ops, one module per op. Each module holds its op's fake (meta)
function, its autograd, and the Python function users call.

The schemas are declared once, in csrc/torch/library.cpp, where each is tied to its
module here (`m.set_python_module`); importing `_C` loads them with their CPU and
CUDA kernels.
"""
from .. import _C  # noqa: F401  (loads the op library)
from .dequant_nf4 import dequantize_nf4, nf4_levels
from .fused_ce import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from .nf4_linear import nf4_linear

__all__ = ["dequantize_nf4", "nf4_levels", "nf4_linear", "fused_linear_cross_entropy",
           "FusedLinearCrossEntropyLoss"]
