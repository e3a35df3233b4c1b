// slothai::nf4_linear: y = x W^T + b with W = dequant_nf4(...) in x's dtype,
// built from the dequant op (through the dispatcher, so CPU and CUDA take their
// own kernels) and at::linear. The dense W lives only for the GEMM. Autograd
// (backward dequantizes again) and the fake function live in slothai/ops/nf4_linear.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace slothai {
namespace {

at::Tensor nf4_linear(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &absmax,
                      const std::optional<at::Tensor> &code2, const std::optional<at::Tensor> &absmax2,
                      const std::optional<at::Tensor> &offset, int64_t blocksize, int64_t blocksize2,
                      c10::SymIntArrayRef shape, const std::optional<at::Tensor> &bias)
{
    TORCH_CHECK_VALUE(shape.size() == 2, "shape must be [out_features, in_features], got ", shape);
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.sym_size(-1) == shape[1], "x must end in in_features = ", shape[1],
                      ", got shape ", x.sym_sizes());
    core_dtype(x.scalar_type(), "x");
    check_device(packed, x.device(), "packed");
    if (bias) {
        TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == shape[0], "bias must have shape [", shape[0],
                          "], got ", bias->sym_sizes());
        check_dtype(*bias, x.scalar_type(), "bias");
        check_device(*bias, x.device(), "bias");
    }
    static const auto dequant = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("slothai::dequant_nf4", "")
                                    .typed<at::Tensor(const at::Tensor &, const at::Tensor &,
                                                      const std::optional<at::Tensor> &,
                                                      const std::optional<at::Tensor> &,
                                                      const std::optional<at::Tensor> &, int64_t, int64_t,
                                                      c10::SymIntArrayRef, at::ScalarType)>();
    const at::Tensor w =
        dequant.call(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, x.scalar_type());
    return at::linear(x, w, bias);
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CPU, m) { m.impl("nf4_linear", &nf4_linear); }
TORCH_LIBRARY_IMPL(slothai, CUDA, m) { m.impl("nf4_linear", &nf4_linear); }

} // namespace slothai
