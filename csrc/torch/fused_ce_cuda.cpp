// slothai::fused_ce on CUDA: the shared chunk loop of fused_ce.cpp with the
// core's CUDA row kernel, on the current stream of the inputs' device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "checks.h"
#include "fused_ce.h"

namespace slothai {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_ce_cuda(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
              const at::Tensor &target, const std::optional<at::Tensor> &grad_rows, int64_t ignore_index,
              double label_smoothing, double softcap, double z_loss, int64_t reduction, int64_t chunk_size,
              bool grad_hidden, bool grad_weight, bool grad_bias)
{
    const c10::cuda::CUDAGuard guard(hidden.device());
    CeDevice dev;
    // Logits budget, capped at an eighth of what is free. A frozen weight: 512 MiB
    // (GEMMs of >= 2K rows at a 128K vocabulary). A trained one: 1 GiB, since
    // every chunk also reads and writes the fp32 dW accumulator (8 bytes per
    // weight element), so fewer chunks move fewer bytes (H100, N=16384, V=128256:
    // 79.5 ms with 1 GiB chunks; 86.8 ms with 512 MiB chunks, in a run that also
    // split the accumulator into 4 vocabulary slabs).
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) free_bytes = size_t(1) << 30;
    const int64_t cap = grad_weight ? int64_t(1) << 30 : int64_t(512) << 20;
    dev.chunk_bytes = std::max<int64_t>(int64_t(64) << 20, std::min<int64_t>(cap, free_bytes / 8));
    dev.rows = [](const slothai_fused_ce_rows_args &a) {
        check_status(slothai_fused_ce_rows_cuda(&a, at::cuda::getCurrentCUDAStream().stream()), "fused_ce rows (cuda)");
    };
    return fused_ce_impl(hidden, weight, bias, target, grad_rows, ignore_index, label_smoothing, softcap, z_loss,
                         reduction, chunk_size, grad_hidden, grad_weight, grad_bias, dev);
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CUDA, m) { m.impl("fused_ce", &fused_ce_cuda); }

} // namespace slothai
