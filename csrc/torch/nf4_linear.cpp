// slothai::nf4_linear: y = x W^T + b (+ lora_x lora_b^T) with W = dequant_nf4(...)
// in x's dtype, built from the dequant op (through the dispatcher, so CPU and CUDA
// take their own kernels) and ATen's GEMMs. The dense W lives only for the GEMM.
// Autograd (backward dequantizes again) and the fake function live in
// slothai/ops/nf4_linear.py.
//
// With a low-rank term (LoRA: lora_x = s A(x), [rows, r]; lora_b = B, [out, r]):
//   y = lora_x lora_b^T (+ b)        a K = r GEMM writes y            (rows x out)
//   y += x W^T                       the base GEMM accumulates (beta = 1)
// Traffic in rows x out passes: two writes and one read, that read in the base
// GEMM's epilogue. Done apart (base, LoRA term, then their sum) it is three writes
// and two reads. Measured (H100, Llama-3.1-8B shape, a training step): 10.5 ms less
// GPU work, though the epilogue's read is not free (docs/design.md). Rounding: the
// LoRA term once into x's dtype, then the sum once.
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "checks.h"

namespace slothai {
namespace {

at::Tensor nf4_linear(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &absmax,
                      const std::optional<at::Tensor> &code2, const std::optional<at::Tensor> &absmax2,
                      const std::optional<at::Tensor> &offset, int64_t blocksize, int64_t blocksize2,
                      c10::SymIntArrayRef shape, const std::optional<at::Tensor> &bias,
                      const std::optional<at::Tensor> &lora_x, const std::optional<at::Tensor> &lora_b)
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
    TORCH_CHECK_VALUE(lora_x.has_value() == lora_b.has_value(), "lora_x and lora_b must be given together, got ",
                      lora_x ? "lora_x" : "lora_b", " alone");
    if (lora_x) {
        check_dtype(*lora_x, x.scalar_type(), "lora_x");
        check_dtype(*lora_b, x.scalar_type(), "lora_b");
        check_device(*lora_x, x.device(), "lora_x");
        check_device(*lora_b, x.device(), "lora_b");
        TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->sym_size(0) == shape[0], "lora_b must have shape [",
                          shape[0], ", r], got ", lora_b->sym_sizes());
        TORCH_CHECK_VALUE(lora_x->dim() == x.dim() &&
                              lora_x->sym_sizes().slice(0, x.dim() - 1) == x.sym_sizes().slice(0, x.dim() - 1) &&
                              lora_x->sym_size(-1) == lora_b->sym_size(1),
                          "lora_x must have x's leading dims and end in r = ", lora_b->sym_size(1), ", got shape ",
                          lora_x->sym_sizes(), " for x of shape ", x.sym_sizes());
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
    if (!lora_x) return at::linear(x, w, bias);

    const auto lead = x.sizes().slice(0, x.dim() - 1);
    const int64_t rows = c10::multiply_integers(lead);
    at::Tensor y = bias ? at::addmm(*bias, lora_x->reshape({rows, lora_x->size(-1)}), lora_b->t())
                        : at::mm(lora_x->reshape({rows, lora_x->size(-1)}), lora_b->t());
    y.addmm_(x.reshape({rows, x.size(-1)}), w.t());
    std::vector<int64_t> out(lead.begin(), lead.end());
    out.push_back(w.size(0));
    return y.view(out);
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CPU, m) { m.impl("nf4_linear", &nf4_linear); }
TORCH_LIBRARY_IMPL(slothai, CUDA, m) { m.impl("nf4_linear", &nf4_linear); }

} // namespace slothai
