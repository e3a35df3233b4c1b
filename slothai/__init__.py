"""slothai: memory- and speed-optimised operators for QLoRA fine-tuning in PyTorch.

    import slothai
    W = slothai.dequantize_nf4(layer.weight)   # bitsandbytes Params4bit -> dense weight
    loss = slothai.fused_linear_cross_entropy(hidden, lm_head.weight, labels)

The package in layers, each importing only those below it:
    ops/        the custom ops (schemas in docs/ops.md) and what is theirs: NF4Weight, the chunked loss
    patching/   model surgery: slothai.patch, the TRL and Unsloth integrations, the FSDP2/DDP hooks
    compiling/  slothai.compile: compiled regions, length buckets, CUDA graphs, saves, offload,
                warm-up, compile_report
    generation/ the patched model's fast generate(): static KV cache, decode step as a CUDA graph
    distributed.py  FSDP2 / DDP user API;  qlora.py, demo.py  random-weight models for the demo and
                benchmarks;  __main__.py  the command line
"""
from .compiling.compile import compile
from .compiling.report import CompileReport, compile_report
from .compiling.warmup import warm_up
from . import generation
from .ops import (CrossEntropyOutput, FusedLinearCrossEntropyLoss, chunked_linear_loss, dequantize_nf4,
                  fused_linear_cross_entropy, nf4_levels, nf4_linear, nf4_matmul)
from .patching.classes import is_patched
from .patching.patch import patch, unpatch

__version__ = "0.1.0"
__all__ = [
    "dequantize_nf4", "nf4_levels", "nf4_linear", "nf4_matmul",
    "patch", "unpatch", "is_patched", "compile", "warm_up", "compile_report", "CompileReport", "generation",
    "fused_linear_cross_entropy", "FusedLinearCrossEntropyLoss", "CrossEntropyOutput", "chunked_linear_loss",
    "__version__",
]
