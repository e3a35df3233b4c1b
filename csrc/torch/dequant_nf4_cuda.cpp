// slothai::dequant_nf4 on CUDA: the checks of dequant_nf4.cpp, then one launch
// of the core kernel on the current stream of the input's device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dequant_nf4.h"

namespace slothai {
namespace {

at::Tensor dequant_nf4_cuda(const at::Tensor &packed, const at::Tensor &absmax, const std::optional<at::Tensor> &code2,
                            const std::optional<at::Tensor> &absmax2, const std::optional<at::Tensor> &offset,
                            int64_t blocksize, int64_t blocksize2, c10::SymIntArrayRef shape, at::ScalarType dtype)
{
    const c10::cuda::CUDAGuard guard(packed.device());
    const Nf4Call c = nf4_call(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype);
    check_status(slothai_dequant_nf4_cuda(&c.args, at::cuda::getCurrentCUDAStream().stream()), "dequant_nf4 (cuda)");
    return c.out;
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CUDA, m) { m.impl("dequant_nf4", &dequant_nf4_cuda); }

} // namespace slothai
