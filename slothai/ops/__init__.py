"""slothai's custom ops, one module per op. Each module holds its op's fake (meta)
function, its autograd, and the Python function users call; beside them what is
theirs: `NF4Weight` (nf4_weight.py, a 4-bit weight FSDP2 can shard),
`chunked_linear_loss` (chunked_loss.py, plain torch: the fused loss's memory saving
for any per-token loss) and Liger-Kernel's fused-loss API on fused_ce (liger.py).

The schemas are declared once, in csrc/torch/library.cpp, where each is tied to its
module here (`m.set_python_module`); importing `_C` loads them with their CPU and
CUDA kernels.
"""
from .. import _C  # noqa: F401  (loads the op library)
from .chunked_loss import chunked_linear_loss
from .dequant_nf4 import dequantize_nf4, nf4_levels
from .fused_ce import CrossEntropyOutput, FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from .nf4_linear import nf4_linear
from .nf4_matmul import nf4_matmul

__all__ = ["dequantize_nf4", "nf4_levels", "nf4_linear", "nf4_matmul", "fused_linear_cross_entropy",
           "FusedLinearCrossEntropyLoss", "CrossEntropyOutput", "chunked_linear_loss"]
