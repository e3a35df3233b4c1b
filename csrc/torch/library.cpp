// The op schemas: the one place where slothai's operators are declared.
// Implementations register per device beside their kernels; fake (meta)
// functions and autograd live in slothai/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(slothai, m)
{
    // NF4 codes (+ block scales, optionally double-quantized) -> dense weight.
    m.def("dequant_nf4(Tensor packed, Tensor absmax, Tensor? code2, Tensor? absmax2, Tensor? offset, "
          "int blocksize, int blocksize2, SymInt[] shape, ScalarType dtype) -> Tensor");
}
