// slothai::scale_ on CUDA: the checks of scale.h, then one launch of the core
// kernel on the current stream of x's device; the factor is read there.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "scale.h"

namespace slothai {
namespace {

void scale_cuda(at::Tensor &x, const at::Tensor &factor)
{
    const c10::cuda::CUDAGuard guard(x.device());
    const slothai_dtype dtype = check_scale(x, factor);
    check_status(slothai_scale_cuda(x.data_ptr(), dtype, x.numel(), factor.data_ptr<float>(),
                                    at::cuda::getCurrentCUDAStream().stream()),
                 "scale_ (cuda)");
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CUDA, m) { m.impl("scale_", &scale_cuda); }

} // namespace slothai
