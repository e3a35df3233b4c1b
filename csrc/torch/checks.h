// Argument checks shared by the CPU and CUDA registrations. Every message names
// the argument, what was expected and what came; all run before any launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "core/slothai.h"

namespace slothai {

inline slothai_dtype core_dtype(at::ScalarType t, const char *name)
{
    switch (t) {
    case at::kFloat: return SLOTHAI_FLOAT32;
    case at::kHalf: return SLOTHAI_FLOAT16;
    case at::kBFloat16: return SLOTHAI_BFLOAT16;
    default:
        TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t);
    }
}

inline void check_dtype(const at::Tensor &t, at::ScalarType want, const char *name)
{
    TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_device(const at::Tensor &t, const at::Device &want, const char *name)
{
    TORCH_CHECK(t.device() == want, name, " must be on ", want, " (where the first input is), got ", t.device());
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

inline void check_status(slothai_status s, const char *what)
{
    TORCH_CHECK(s == SLOTHAI_OK, "slothai: ", what, " failed: ", slothai_status_string(s));
}

// One dequant_nf4 call's arguments: the core's argument block and the tensors
// its pointers point into (the output, and any contiguous or fp32 copies of the
// inputs), which must outlive the launch.
struct Nf4Call {
    slothai_nf4_args args{};
    at::Tensor out, packed, absmax, code2, absmax2, offset;
};

// Validates the dequant_nf4 arguments against each other, allocates the output
// and returns the core's argument block pointing at it.
Nf4Call nf4_call(const at::Tensor &packed, const at::Tensor &absmax, const std::optional<at::Tensor> &code2,
                 const std::optional<at::Tensor> &absmax2, const std::optional<at::Tensor> &offset,
                 int64_t blocksize, int64_t blocksize2, c10::SymIntArrayRef shape, at::ScalarType dtype);

} // namespace slothai
