"""slothai: memory- and speed-optimised operators for QLoRA fine-tuning in PyTorch.

    import slothai
    W = slothai.dequantize_nf4(layer.weight)   # bitsandbytes Params4bit -> dense weight

Ops: torch.ops.slothai.dequant_nf4 (see README for the schema).
"""
from . import ops  # noqa: F401  (loads and registers the custom ops)
from .nf4 import dequantize_nf4, nf4_levels

__version__ = "0.1.0"
__all__ = ["dequantize_nf4", "nf4_levels", "__version__"]
