"""Every slothai op is declared once (slothai/ops/library.py) and has, from its
own module, a kernel for the CPU and CUDA, a fake function, and autograd for the
differentiable ones (nf4_linear_group's Autograd kernel refuses gradients); a missing
registration fails here, by name."""
import torch

import slothai  # noqa: F401  (loads the ops)
from slothai.ops import library

OPS = {"dequant_nf4": False, "nf4_linear": True, "nf4_matmul": True, "nf4_linear_group": True, "fused_ce": True,
       "scale_": False}  # name -> has an Autograd kernel


def test_every_op_has_its_kernels_fake_and_autograd():
    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("slothai::"))
    assert names == sorted(OPS)
    for name, differentiable in OPS.items():
        qualname = f"slothai::{name}"
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (qualname, key)
        assert torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None, qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd") == differentiable, qualname


def test_every_schema_comes_from_the_one_library():
    assert sorted(op.split("::")[1].split(".")[0] for op in library.LIB._op_defs) == sorted(OPS)
