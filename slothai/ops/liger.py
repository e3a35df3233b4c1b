"""Liger-Kernel's fused linear cross-entropy API (0.8), served by slothai::fused_ce: code
written for Liger switches by an import.

    # from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    # from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from slothai.ops.liger import LigerFusedLinearCrossEntropyLoss, liger_fused_linear_cross_entropy

Same names, argument order and defaults as Liger's (tests/test_fused_ce_options.py holds
them against Liger 0.8.5's), and the same return convention: the loss alone, or, when a
`return_*` flag is set, a `CrossEntropyOutput(loss, z_loss, token_accuracy,
predicted_tokens)` with the fields not asked for None. The numbers are Liger's formulas
(`fused_linear_cross_entropy`'s docstring); where the two differ:
- `accum_dtype`: None sums a trained weight's gradient across chunks in the weight's own
  dtype, as Liger does; `torch.float32` in fp32 (slothai's own default). Others raise.
- `chunk_mem_const`: checked as Liger checks it, then unused (slothai sizes its chunks
  by bytes of logits).
- z_loss comes back in fp32 (Liger: in the input's dtype); inputs may have any leading
  shape (Liger: 2-D), and per-row outputs take target's shape.
- No host sync (Liger reads the count of counted rows and the weight sums on the host).
- Bad arguments raise ValueError / TypeError naming them (Liger: AssertionError).
"""
import operator

import torch

from .fused_ce import CrossEntropyOutput, check_ce_weight, check_reduction, fused_linear_cross_entropy

__all__ = ["CrossEntropyOutput", "LigerFusedLinearCrossEntropyLoss", "liger_fused_linear_cross_entropy"]


def _fp32_weight_grad(accum_dtype, weight):
    if accum_dtype is None or accum_dtype == weight.dtype:
        return False
    if accum_dtype == torch.float32:
        return True
    raise ValueError(f"accum_dtype must be None (the weight's dtype), the weight's dtype or torch.float32, "
                     f"got {accum_dtype}")


def _check_flags(**flags):
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                                     lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                                     return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                                     return_token_accuracy=False, return_predicted_tokens=False, chunk_mem_const=1):
    """`liger_kernel.transformers.functional.liger_fused_linear_cross_entropy`, on slothai."""
    _check_flags(return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                 return_predicted_tokens=return_predicted_tokens)
    if isinstance(chunk_mem_const, bool) or not isinstance(chunk_mem_const, int) or chunk_mem_const < 1:
        raise ValueError(f"chunk_mem_const must be a positive integer, got {chunk_mem_const!r}")
    return fused_linear_cross_entropy(
        input, weight, target, bias, ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=lse_square_scale,
        fp32_weight_grad=_fp32_weight_grad(accum_dtype, weight), use_token_scaling=use_token_scaling,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens)


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """`liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss`, on slothai: the
    options at construction, `forward(lin_weight, _input, target, bias=None)`."""

    def __init__(self, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                 reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                 return_token_accuracy=False, return_predicted_tokens=False):
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        check_reduction(reduction)
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {softcap!r}")
        check_ce_weight(ce_weight)
        _check_flags(return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                     return_predicted_tokens=return_predicted_tokens)
        operator.index(ignore_index)
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.accum_dtype = accum_dtype
        self.use_token_scaling = use_token_scaling
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens

    def forward(self, lin_weight, _input, target, bias=None):
        return liger_fused_linear_cross_entropy(
            _input, lin_weight, target, bias, ce_weight=self.ce_weight, ignore_index=self.ignore_index,
            lse_square_scale=self.lse_square_scale, label_smoothing=self.label_smoothing, reduction=self.reduction,
            softcap=self.softcap, return_z_loss=self.return_z_loss, accum_dtype=self.accum_dtype,
            use_token_scaling=self.use_token_scaling, return_token_accuracy=self.return_token_accuracy,
            return_predicted_tokens=self.return_predicted_tokens)
