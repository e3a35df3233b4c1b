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
//
// On CUDA, for a few rows of x (decode, GRPO sampling: kFourBitRows below), it
// calls slothai::nf4_matmul instead, which reads the codes straight into the
// product and writes nothing of W; the LoRA term and bias join there too.
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "nf4_matmul.h"

namespace slothai {
namespace {

// Up to this many rows of x, nf4_linear on CUDA reads the weight 4-bit
// (nf4_matmul: bound by the codes' bytes, ~0.52 a weight) instead of
// dequantizing it (~4.5 bytes a weight moved, then a GEMM that wins on
// arithmetic for more rows). Measured on an H200: benchmarks/results/nf4_matmul.json.
constexpr int64_t kFourBitRows = 16;

at::Tensor nf4_linear(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &absmax,
                      const std::optional<at::Tensor> &code2, const std::optional<at::Tensor> &absmax2,
                      const std::optional<at::Tensor> &offset, int64_t blocksize, int64_t blocksize2,
                      c10::SymIntArrayRef shape, const std::optional<at::Tensor> &bias,
                      const std::optional<at::Tensor> &lora_x, const std::optional<at::Tensor> &lora_b)
{
    check_linear_args(x, packed, shape, bias, lora_x, lora_b);
    const auto lead = x.sizes().slice(0, x.dim() - 1);
    const int64_t rows = c10::multiply_integers(lead);
    if (x.is_cuda() && x.scalar_type() != at::kFloat && rows <= kFourBitRows) {
        static const auto matmul = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("slothai::nf4_matmul", "")
                                       .typed<decltype(nf4_linear)>();
        return matmul.call(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias, lora_x,
                           lora_b);
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
