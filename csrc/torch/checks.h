// Argument checks shared by the CPU and CUDA registrations. Every message names
// the argument, what was expected and what came; all run before any launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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
    TORCH_CHECK_VALUE(t.device() == want, name, " must be on ", want, " (where the first input is), got ", t.device());
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

inline void check_status(slothai_status s, const char *what)
{
    TORCH_CHECK(s == SLOTHAI_OK, "slothai: ", what, " failed: ", slothai_status_string(s));
}

} // namespace slothai
