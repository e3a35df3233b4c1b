// slothai::dequant_nf4's argument checks, shared by its CPU and CUDA
// registrations (dequant_nf4.cpp, dequant_nf4_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace slothai {

// One dequant_nf4 call's arguments: the core's argument block and the tensors
// its pointers point into (the output, and any contiguous or fp32 copies of the
// inputs), which must outlive the launch.
struct Nf4Call {
    slothai_nf4_args args{};
    at::Tensor out, packed, absmax, code2, absmax2, offset;
};

// Validates the dequant_nf4 arguments against each other, allocates the output
// (unless `dense` is false: nf4_matmul reads the codes and writes no weight)
// and returns the core's argument block pointing at it.
Nf4Call nf4_call(const at::Tensor &packed, const at::Tensor &absmax, const std::optional<at::Tensor> &code2,
                 const std::optional<at::Tensor> &absmax2, const std::optional<at::Tensor> &offset,
                 int64_t blocksize, int64_t blocksize2, c10::SymIntArrayRef shape, at::ScalarType dtype,
                 bool dense = true);

} // namespace slothai
