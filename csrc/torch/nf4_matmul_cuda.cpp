// slothai::nf4_matmul on CUDA: the checks of nf4_matmul.cpp, then one launch of
// the core kernel on the current stream of x's device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "nf4_matmul.h"

namespace slothai {
namespace {

at::Tensor nf4_matmul_cuda(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &absmax,
                           const std::optional<at::Tensor> &code2, const std::optional<at::Tensor> &absmax2,
                           const std::optional<at::Tensor> &offset, int64_t blocksize, int64_t blocksize2,
                           c10::SymIntArrayRef shape, const std::optional<at::Tensor> &bias,
                           const std::optional<at::Tensor> &lora_x, const std::optional<at::Tensor> &lora_b)
{
    const c10::cuda::CUDAGuard guard(x.device());
    const Nf4MatmulCall c =
        nf4_matmul_call(x, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, bias, lora_x, lora_b);
    check_status(slothai_nf4_matmul_cuda(&c.args, at::cuda::getCurrentCUDAStream().stream()), "nf4_matmul (cuda)");
    return c.out;
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CUDA, m) { m.impl("nf4_matmul", &nf4_matmul_cuda); }

} // namespace slothai
