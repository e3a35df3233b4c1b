// slothai::scale_, shared by the CPU and CUDA registrations: the argument checks.
#pragma once

#include "checks.h"

namespace slothai {

// x: a contiguous fp32 / fp16 / bf16 tensor; factor: one fp32 value on x's device.
inline slothai_dtype check_scale(const at::Tensor &x, const at::Tensor &factor)
{
    const slothai_dtype dtype = core_dtype(x.scalar_type(), "self");
    TORCH_CHECK_VALUE(x.is_contiguous(), "self must be contiguous (it is scaled in place)");
    check_device(factor, x.device(), "factor");
    check_dtype(factor, at::kFloat, "factor");
    TORCH_CHECK_VALUE(factor.numel() == 1, "factor must hold one value, got ", factor.numel());
    return dtype;
}

} // namespace slothai
