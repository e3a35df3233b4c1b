"""slothai: memory- and speed-optimised operators for QLoRA fine-tuning in PyTorch.

    import slothai
    W = slothai.dequantize_nf4(layer.weight)   # bitsandbytes Params4bit -> dense weight
    loss = slothai.fused_linear_cross_entropy(hidden, lm_head.weight, labels)

Ops: torch.ops.slothai.dequant_nf4, .nf4_linear and .fused_ce (schemas in the README;
one module each in slothai/ops/).
"""
from .chunked_loss import chunked_linear_loss
from .ops import FusedLinearCrossEntropyLoss, dequantize_nf4, fused_linear_cross_entropy, nf4_levels, nf4_linear
from .patch import is_patched, patch, unpatch
from .regional import compile
from .report import CompileReport, compile_report
from .warmup import warm_up

__version__ = "0.1.0"
__all__ = [
    "dequantize_nf4", "nf4_levels", "nf4_linear",
    "patch", "unpatch", "is_patched", "compile", "warm_up", "compile_report", "CompileReport",
    "fused_linear_cross_entropy", "FusedLinearCrossEntropyLoss", "chunked_linear_loss",
    "__version__",
]
