// slothai::fused_ce: linear + cross-entropy that never holds more than one
// chunk of logits. Per chunk of rows c (3 GEMMs when gradients are wanted):
//   z_c   = x_c W^T (+ b)                      [rows x V, input dtype]
//   loss_c, dz_c (in place of z_c)             core kernel, fp32 math
//   dx_c  = dz_c W                             written straight into dX
//   dW   += dz_c^T x_c                         fp32 accumulator across chunks
//   db   += sum_rows dz_c                      fp32
// With reduction sum/mean the gradients are formed here, in the forward, for an
// upstream gradient of 1 (mean: scaled by 1 / #counted rows, read on the device,
// no host sync); autograd multiplies in the real one. With reduction none the
// backward calls this op again with per-row factors (grad_rows).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "fused_ce.h"

namespace slothai {

namespace {

enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

// dst += a @ b with an fp32 dst and half-precision a, b: cuBLAS accumulates in
// fp32 and adds into fp32 on CUDA; the CPU path upcasts.
void addmm_fp32(at::Tensor &dst, const at::Tensor &a, const at::Tensor &b)
{
    if (a.scalar_type() == at::kFloat)
        dst.addmm_(a, b);
    else if (dst.is_cuda())
        at::addmm_out(dst, dst, a, b, at::kFloat);
    else
        dst.addmm_(a.to(at::kFloat), b.to(at::kFloat));
}

void check_inputs(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                  const at::Tensor &target, const std::optional<at::Tensor> &grad_rows, double label_smoothing,
                  double softcap, int64_t reduction)
{
    const at::Device dev = hidden.device();
    core_dtype(hidden.scalar_type(), "hidden");
    TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be 2-D (tokens, hidden), got ", hidden.dim(), "-D");
    TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (vocab, hidden), got ", weight.dim(), "-D");
    check_device(weight, dev, "weight");
    check_dtype(weight, hidden.scalar_type(), "weight");
    TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "weight has ", weight.size(1),
                      " columns but hidden has size ", hidden.size(1));
    TORCH_CHECK_VALUE(weight.size(0) > 0, "weight must have at least one row (vocabulary entry)");
    if (bias) {
        check_device(*bias, dev, "bias");
        check_dtype(*bias, hidden.scalar_type(), "bias");
        TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                          weight.size(0), ",), got ", bias->sizes());
    }
    check_device(target, dev, "target");
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                     "target must be int64 or int32, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == hidden.size(0), "target must have shape (",
                      hidden.size(0), ",) to match hidden, got ", target.sizes());
    if (grad_rows) {
        check_device(*grad_rows, dev, "grad_rows");
        check_dtype(*grad_rows, at::kFloat, "grad_rows");
        TORCH_CHECK_VALUE(grad_rows->numel() == hidden.size(0) || grad_rows->numel() == 1,
                          "grad_rows must hold 1 or ", hidden.size(0), " values, got ", grad_rows->numel());
    }
    TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                      "label_smoothing must be in [0, 1], got ", label_smoothing);
    TORCH_CHECK_VALUE(softcap >= 0.0, "softcap must be positive (or 0 for none), got ", softcap);
    TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kMean, "reduction must be 0 (none), 1 (sum) or 2 (mean), got ",
                      reduction);
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_ce_impl(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
              const at::Tensor &target_in, const std::optional<at::Tensor> &grad_rows, int64_t ignore_index,
              double label_smoothing, double softcap, double z_loss, int64_t reduction, int64_t chunk_size,
              bool grad_hidden, bool grad_weight, bool grad_bias, const CeDevice &dev)
{
    check_inputs(hidden, weight, bias, target_in, grad_rows, label_smoothing, softcap, reduction);
    const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
    const at::Tensor x = hidden.contiguous(), w = weight.contiguous();
    const at::Tensor target = target_in.to(at::kLong).contiguous();
    const auto opts = x.options();
    const auto fopts = opts.dtype(at::kFloat);

    if (!x.is_cuda()) {
        // On the CPU a bad target costs nothing to find: raise. (On CUDA such
        // rows come out NaN instead of forcing a host sync.)
        const at::Tensor bad = (target != ignore_index).logical_and_((target < 0).logical_or_(target >= V));
        TORCH_CHECK_VALUE(!bad.any().item<bool>(), "target must be in [0, ", V, ") or ignore_index (", ignore_index,
                          "), got ", target.masked_select(bad)[0].item<int64_t>());
    }

    // Upstream factor per row: given (backward of reduction none), or 1 / 1/count
    // (the reduced loss' own gradient), or none at all (forward only).
    at::Tensor counted = (target != ignore_index).sum();
    at::Tensor g;
    if (grad_rows)
        g = grad_rows->contiguous();
    else if (reduction != kNone && (grad_hidden || grad_weight || (grad_bias && bias)))
        g = reduction == kMean ? counted.clamp_min(1).to(at::kFloat).reciprocal() : at::ones({1}, fopts);
    const bool with_grad = g.defined();
    grad_hidden &= with_grad;
    grad_weight &= with_grad;
    grad_bias &= with_grad && bias.has_value();

    at::Tensor loss = at::empty({N}, fopts);
    at::Tensor dx = at::empty({grad_hidden ? N : 0, grad_hidden ? H : 0}, opts);
    at::Tensor dw, dw_acc, db_acc;

    if (N > 0) {
        int64_t chunk = chunk_size > 0 ? chunk_size : dev.chunk_bytes / (V * (int64_t)x.element_size());
        chunk = std::max<int64_t>(1, std::min(chunk, N));
        const int64_t nchunks = (N + chunk - 1) / chunk;
        // One chunk: cuBLAS's own fp32 accumulation is the whole sum, write dW directly.
        const bool dw_direct = nchunks == 1;
        if (grad_weight && !dw_direct) dw_acc = at::zeros({V, H}, fopts);
        if (grad_bias) db_acc = at::zeros({V}, fopts);
        at::Tensor zbuf = at::empty({chunk, V}, opts);
        const at::Tensor wt = w.t();

        for (int64_t start = 0; start < N; start += chunk) {
            const int64_t rows = std::min(chunk, N - start);
            const at::Tensor xc = x.narrow(0, start, rows);
            at::Tensor z = zbuf.narrow(0, 0, rows);
            if (bias)
                at::addmm_out(z, *bias, xc, wt);
            else
                at::mm_out(z, xc, wt);

            slothai_fused_ce_rows_args a{};
            a.logits = z.data_ptr();
            a.dtype = core_dtype(x.scalar_type(), "hidden");
            a.rows = rows;
            a.vocab = V;
            a.ld = V;
            a.target = target.data_ptr<int64_t>() + start;
            a.ignore_index = ignore_index;
            a.label_smoothing = (float)label_smoothing;
            a.softcap = (float)softcap;
            a.z_loss = (float)z_loss;
            if (with_grad) {
                a.grad_stride = g.numel() == 1 ? 0 : 1;
                a.grad = g.data_ptr<float>() + a.grad_stride * start;
            }
            a.loss = loss.data_ptr<float>() + start;
            dev.rows(a);

            if (!with_grad) continue;
            if (grad_hidden) {
                at::Tensor dxc = dx.narrow(0, start, rows);
                at::mm_out(dxc, z, w);
            }
            if (grad_weight) {
                if (dw_direct)
                    dw = at::mm(z.t(), xc);
                else
                    addmm_fp32(dw_acc, z.t(), xc);
            }
            if (grad_bias) db_acc.add_(z.sum(0, false, at::kFloat));
        }
        zbuf.reset();
        if (grad_weight && !dw_direct) {
            dw = dw_acc.to(x.scalar_type());
            dw_acc.reset();
        }
    } else if (grad_weight) {
        dw = at::zeros({V, H}, opts);
        if (grad_bias) db_acc = at::zeros({V}, fopts);
    }

    if (!dw.defined()) dw = at::empty({0, 0}, opts);
    at::Tensor db = grad_bias ? db_acc.to(x.scalar_type()) : at::empty({0}, opts);
    if (reduction == kSum) {
        loss = loss.sum();
    } else if (reduction == kMean) {
        loss = loss.sum() / counted; // 0 / 0 = NaN when every row is ignored, as torch
    }
    return {loss, dx, dw, db};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_ce_cpu(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
             const at::Tensor &target, const std::optional<at::Tensor> &grad_rows, int64_t ignore_index,
             double label_smoothing, double softcap, double z_loss, int64_t reduction, int64_t chunk_size,
             bool grad_hidden, bool grad_weight, bool grad_bias)
{
    CeDevice dev;
    dev.chunk_bytes = int64_t(64) << 20;
    dev.rows = [](const slothai_fused_ce_rows_args &a) {
        at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
            check_status(slothai_fused_ce_rows_cpu(&a, begin, end), "fused_ce rows (cpu)");
        });
    };
    return fused_ce_impl(hidden, weight, bias, target, grad_rows, ignore_index, label_smoothing, softcap, z_loss,
                         reduction, chunk_size, grad_hidden, grad_weight, grad_bias, dev);
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CPU, m) { m.impl("fused_ce", &fused_ce_cpu); }

} // namespace slothai
