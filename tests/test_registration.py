"""Every slothai op is tied to its Python module (m.set_python_module in
csrc/torch/library.cpp), which registers its fake function (and its autograd,
for the differentiable ones); a missing registration fails here, by name."""
import torch

import slothai  # noqa: F401  (loads the ops)

OPS = {"dequant_nf4": False, "nf4_linear": True, "nf4_matmul": True, "fused_ce": True, "scale_": False}  # name -> differentiable


def test_every_op_is_registered_from_its_own_module():
    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("slothai::"))
    assert names == sorted(OPS)
    for name, differentiable in OPS.items():
        qualname = f"slothai::{name}"
        module, _ = torch._C._dispatch_pystub(qualname, "")
        assert module == f"slothai.ops.{name.rstrip('_')}", qualname  # an in-place op's module drops the _
        assert torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None, qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd") == differentiable, qualname
