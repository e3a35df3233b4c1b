// slothai::fused_ce, shared by the CPU and CUDA registrations: the chunk loop
// and its GEMMs (through ATen, so cuBLAS on CUDA), with the per-row
// cross-entropy math supplied by the device's core kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/string_view.h>

#include <functional>
#include <optional>
#include <tuple>

#include "core/slothai.h"

namespace slothai {

enum class Reduction { kNone, kSum, kMean };

// "none" / "sum" / "mean" (as torch's losses take it); anything else raises ValueError.
Reduction parse_reduction(c10::string_view reduction);

// The op's scalar arguments, in schema order after the tensors.
struct FusedCeOptions {
    int64_t ignore_index;
    double label_smoothing, softcap, z_loss; // softcap 0: none
    Reduction reduction;
    int64_t chunk_size; // rows per chunk; <= 0: from the device's logits budget
    // The gradients to form, exactly: each needs an upstream factor (grad_rows,
    // or the reduced loss' own with reduction sum / mean); grad_bias needs a bias.
    bool grad_hidden, grad_weight, grad_bias;
    // dW summed over chunks in fp32, rounded once (eager's accuracy; a V x H fp32
    // accumulator), or in the input dtype, rounded once per chunk (no accumulator).
    bool fp32_weight_grad;
    // Each row's loss and gradient times its detached probability of the target.
    bool use_token_scaling;
    // The outputs past the loss: the z-loss term alone, the fraction of counted rows
    // whose argmax is the target (per row with reduction none), the argmax per row.
    bool return_z_loss, return_token_accuracy, return_predicted_tokens;

    bool any_grad() const { return grad_hidden || grad_weight || grad_bias; }
};

// What differs per device: the core's row kernel, a chunk's logits budget, and
// whether the host may wait for the device (to count the rows it can skip).
struct FusedCeDevice {
    std::function<void(const slothai_fused_ce_rows_args &)> rows; // runs the kernel on all rows of a chunk
    int64_t chunk_bytes;                                          // logits budget when chunk_size <= 0
    bool may_sync;                                                // false while a CUDA graph is captured
};

// loss, dhidden, dweight, dbias, z loss, token accuracy, predicted tokens
using FusedCeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FusedCeResult fused_ce_impl(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                            const at::Tensor &target, const std::optional<at::Tensor> &grad_rows,
                            const std::optional<at::Tensor> &ce_weight, const FusedCeOptions &o,
                            const FusedCeDevice &dev);

// The op's kernel with its dispatcher signature (the schema in library.cpp),
// written once for every device: packs the scalars, and under a guard for
// hidden's device runs the shared loop with that device's FusedCeDevice.
template <FusedCeDevice (*device)(const FusedCeOptions &)>
FusedCeResult fused_ce_kernel(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                              const at::Tensor &target, const std::optional<at::Tensor> &grad_rows,
                              int64_t ignore_index, double label_smoothing, double softcap, double z_loss,
                              c10::string_view reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight,
                              bool grad_bias, bool fp32_weight_grad, const std::optional<at::Tensor> &ce_weight,
                              bool use_token_scaling, bool return_z_loss, bool return_token_accuracy,
                              bool return_predicted_tokens)
{
    const c10::DeviceGuard guard(hidden.device());
    const FusedCeOptions o{ignore_index, label_smoothing, softcap, z_loss, parse_reduction(reduction), chunk_size,
                           grad_hidden, grad_weight, grad_bias, fp32_weight_grad, use_token_scaling,
                           return_z_loss, return_token_accuracy, return_predicted_tokens};
    return fused_ce_impl(hidden, weight, bias, target, grad_rows, ce_weight, o, device(o));
}

} // namespace slothai
