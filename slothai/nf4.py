"""Kept so that `slothai.nf4` imports keep working: the NF4 ops live in
slothai/ops/dequant_nf4.py and slothai/ops/nf4_linear.py."""
from .ops.dequant_nf4 import check_quant_state as _check_state  # noqa: F401
from .ops.dequant_nf4 import dequantize_nf4, nf4_levels  # noqa: F401
from .ops.dequant_nf4 import quant_state_args as _state_args_of  # noqa: F401
from .ops.nf4_linear import nf4_linear  # noqa: F401
