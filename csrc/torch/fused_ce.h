// slothai::fused_ce, shared by the CPU and CUDA registrations: the chunk loop
// and its GEMMs (through ATen, so cuBLAS on CUDA), with the per-row
// cross-entropy math supplied by the device's core kernel.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <tuple>

#include "core/slothai.h"

namespace slothai {

struct CeDevice {
    std::function<void(const slothai_fused_ce_rows_args &)> rows; // run the core kernel on all rows
    int64_t chunk_bytes;                                   // logits budget when chunk_size <= 0
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_ce_impl(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
              const at::Tensor &target, const std::optional<at::Tensor> &grad_rows, int64_t ignore_index,
              double label_smoothing, double softcap, double z_loss, int64_t reduction, int64_t chunk_size,
              bool grad_hidden, bool grad_weight, bool grad_bias, const CeDevice &dev);

} // namespace slothai
