"""slothai's custom ops, one module per op. Each module holds its op's fake (meta)
function, its autograd, and the Python function users call; beside them what is
theirs: `NF4Weight` (nf4_weight.py, a 4-bit weight FSDP2 can shard),
`chunked_linear_loss` (chunked_loss.py, plain torch: the fused loss's memory saving
for any per-token loss) and Liger-Kernel's fused-loss API on fused_ce (liger.py).

The schemas are declared once, in library.py; each op's kernel (CPU and CUDA, one
call into the C core through kernels.py) registers in its module, beside its fake
and autograd.
"""
from . import library  # noqa: F401  (the schemas, before anything registers on them)
from .chunked_loss import chunked_linear_loss
from .dequant_nf4 import dequantize_nf4, nf4_levels
from .fused_ce import CrossEntropyOutput, FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from .nf4_group import nf4_linear_group
from .nf4_linear import nf4_linear
from .nf4_matmul import nf4_matmul

__all__ = ["dequantize_nf4", "nf4_levels", "nf4_linear", "nf4_matmul", "nf4_linear_group",
           "fused_linear_cross_entropy", "FusedLinearCrossEntropyLoss", "CrossEntropyOutput", "chunked_linear_loss"]
