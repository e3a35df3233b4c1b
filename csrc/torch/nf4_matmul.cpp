// slothai::nf4_matmul: x @ W^T (+ bias) (+ lora_x @ lora_b^T) with the NF4
// weight read 4-bit (csrc/core/nf4_matmul*.c*), nothing of W written. The
// checks shared with nf4_linear, the argument block, and the CPU kernel; the
// CUDA one registers in nf4_matmul_cuda.cpp; fake and autograd in
// slothai/ops/nf4_linear.py.
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "nf4_matmul.h"

namespace slothai {

void check_linear_args(const at::Tensor &x, const at::Tensor &packed, c10::SymIntArrayRef shape,
                       const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &lora_x,
                       const std::optional<at::Tensor> &lora_b)
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
}

Nf4MatmulCall nf4_matmul_call(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &absmax,
                              const std::optional<at::Tensor> &code2, const std::optional<at::Tensor> &absmax2,
                              const std::optional<at::Tensor> &offset, int64_t blocksize, int64_t blocksize2,
                              c10::SymIntArrayRef shape, const std::optional<at::Tensor> &bias,
                              const std::optional<at::Tensor> &lora_x, const std::optional<at::Tensor> &lora_b)
{
    check_linear_args(x, packed, shape, bias, lora_x, lora_b);
    Nf4MatmulCall c;
    c.weight = nf4_call(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, x.scalar_type(),
                        /*dense=*/false);
    slothai_nf4_matmul_args &a = c.args;
    a.w = c.weight.args;
    a.dtype = core_dtype(x.scalar_type(), "x");
    const auto lead = x.sizes().slice(0, x.dim() - 1);
    a.m = c10::multiply_integers(lead);
    a.n = shape[0].expect_int();
    a.k = shape[1].expect_int();
    c.x = x.contiguous();
    a.x = c.x.data_ptr();
    if (bias) {
        c.bias = bias->contiguous();
        a.bias = c.bias.data_ptr();
    }
    if (lora_x) {
        c.lora_x = lora_x->contiguous();
        c.lora_b = lora_b->contiguous();
        a.r = c.lora_b.size(1);
        a.lora_x = c.lora_x.data_ptr();
        a.lora_b = c.lora_b.data_ptr();
    }
    std::vector<int64_t> out(lead.begin(), lead.end());
    out.push_back(a.n);
    c.out = at::empty(out, x.options());
    a.out = c.out.data_ptr();
    return c;
}

namespace {

at::Tensor nf4_matmul_cpu(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &absmax,
                          const std::optional<at::Tensor> &code2, const std::optional<at::Tensor> &absmax2,
                          const std::optional<at::Tensor> &offset, int64_t blocksize, int64_t blocksize2,
                          c10::SymIntArrayRef shape, const std::optional<at::Tensor> &bias,
                          const std::optional<at::Tensor> &lora_x, const std::optional<at::Tensor> &lora_b)
{
    const Nf4MatmulCall c =
        nf4_matmul_call(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias, lora_x, lora_b);
    // Split over output features: each thread expands its rows of W once.
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, c.args.k));
    at::parallel_for(0, c.args.n, grain, [&](int64_t begin, int64_t end) {
        check_status(slothai_nf4_matmul_cpu(&c.args, begin, end), "nf4_matmul (cpu)");
    });
    return c.out;
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CPU, m) { m.impl("nf4_matmul", &nf4_matmul_cpu); }

} // namespace slothai
