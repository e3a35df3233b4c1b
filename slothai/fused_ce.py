"""Kept so that `slothai.fused_ce` imports keep working: the op lives in
slothai/ops/fused_ce.py, chunked_linear_loss in slothai/chunked_loss.py."""
from .chunked_loss import chunked_linear_loss  # noqa: F401
from .ops.fused_ce import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy  # noqa: F401
