// slothai::scale_ on the CPU: x *= factor in place, in fp32, rounded once
// (formula: slothai_scale_cpu in core/slothai.h). The fake function:
// slothai/ops/scale.py; the CUDA registration: scale_cuda.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "scale.h"

namespace slothai {
namespace {

void scale_cpu(at::Tensor &x, const at::Tensor &factor)
{
    const slothai_dtype dtype = check_scale(x, factor);
    void *data = x.data_ptr();
    const float *g = factor.data_ptr<float>();
    at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
        check_status(slothai_scale_cpu(data, dtype, begin, end, g), "scale_ (cpu)");
    });
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CPU, m) { m.impl("scale_", &scale_cpu); }

} // namespace slothai
