// slothai::nf4_linear and slothai::nf4_matmul share a schema and their argument
// checks (nf4_matmul.cpp); nf4_matmul's CPU and CUDA registrations share the
// preparation of the core's argument block.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "dequant_nf4.h"

namespace slothai {

// x against the weight's [out_features, in_features] shape, the bias, and the
// low-rank pair (lora_x [..., r] with x's leading dims, lora_b [out_features, r]):
// dtypes, devices and sizes, each message naming its argument.
void check_linear_args(const at::Tensor &x, const at::Tensor &packed, c10::SymIntArrayRef shape,
                       const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &lora_x,
                       const std::optional<at::Tensor> &lora_b);

// One nf4_matmul call: the core's argument block, the weight's (nf4_call, no
// dense output), and the tensors its pointers point into.
struct Nf4MatmulCall {
    slothai_nf4_matmul_args args{};
    Nf4Call weight;
    at::Tensor x, bias, lora_x, lora_b, out;
};

Nf4MatmulCall nf4_matmul_call(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &absmax,
                              const std::optional<at::Tensor> &code2, const std::optional<at::Tensor> &absmax2,
                              const std::optional<at::Tensor> &offset, int64_t blocksize, int64_t blocksize2,
                              c10::SymIntArrayRef shape, const std::optional<at::Tensor> &bias,
                              const std::optional<at::Tensor> &lora_x, const std::optional<at::Tensor> &lora_b);

} // namespace slothai
