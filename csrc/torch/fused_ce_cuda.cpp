// slothai::fused_ce on CUDA: the shared chunk loop of fused_ce.cpp with the
// core's CUDA row kernel, on the current stream of the inputs' device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "checks.h"
#include "fused_ce.h"

namespace slothai {
namespace {

// Runs under fused_ce_kernel's guard for the inputs' device.
FusedCeDevice cuda_device(const FusedCeOptions &o)
{
    FusedCeDevice dev;
    // Logits budget, capped at an eighth of what is free. A frozen weight: 256 MiB
    // (1K rows at a 128K vocabulary; H100, N=16384 H=4096 V=128256: 53.0 ms /
    // 0.54 GB with 1K-row chunks, 54.7 ms / 0.67 GB with 512 MiB ones). A trained
    // one: 1 GiB, since every chunk also reads and writes the dW sum (8 bytes per
    // weight element in fp32, 4 in bf16), so fewer chunks move fewer bytes (same
    // shape, fp32: 84.1 ms with 1 GiB chunks, 97.8 ms with 1K-row ones) and, in
    // bf16, round fewer times; rows_per_chunk caps such a chunk at `hidden` rows.
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) free_bytes = size_t(1) << 30;
    const int64_t cap = o.grad_weight ? int64_t(1) << 30 : int64_t(256) << 20;
    dev.chunk_bytes = std::max<int64_t>(int64_t(64) << 20, std::min<int64_t>(cap, free_bytes / 8));
    // Counting the rows to skip waits for the device, which a stream being captured
    // into a CUDA graph must not: there every row is computed.
    dev.may_sync = c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
    dev.rows = [](const slothai_fused_ce_rows_args &a) {
        check_status(slothai_fused_ce_rows_cuda(&a, at::cuda::getCurrentCUDAStream().stream()),
                     "fused_ce rows (cuda)");
    };
    return dev;
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CUDA, m) { m.impl("fused_ce", &fused_ce_kernel<cuda_device>); }

} // namespace slothai
