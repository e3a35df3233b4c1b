// slothai::fused_ce: linear + cross-entropy that never holds more than one
// chunk of logits. Per chunk c of the rows computed (Rows: those whose target
// counts, where the host may wait for their number; 3 GEMMs with gradients):
//   z_c   = x_c W^T (+ b)                      [rows x V, input dtype]
//   loss_c, dz_c (in place of z_c)             core kernel, fp32 math
//   dx_c  = dz_c W                             into its rows of dX (skipped rows: 0)
//   dW   += dz_c^T x_c                         fp32 accumulator across chunks, or
//                                              the input dtype (fp32_weight_grad off)
//   db   += sum_rows dz_c                      fp32
// The gradients asked for (grad_* flags) are formed for per-row upstream factors
// (grad_rows; the backward of reduction none passes them) or, with reduction
// sum / mean, for the reduced loss' own upstream 1 (mean: 1 / #counted rows, or
// 1 / the sum of their targets' class weights, read on the device, no host sync);
// autograd multiplies in the real one. The z loss, token accuracy and predicted
// tokens asked for come out of the row kernel (no pass of their own) and are
// reduced here, on the device. The fake function and autograd:
// slothai/ops/fused_ce.py; the reasoning: docs/design.md.
#include <ATen/Parallel.h>
#include <cmath>
#include <torch/library.h>

#include "checks.h"
#include "fused_ce.h"

namespace slothai {

Reduction parse_reduction(c10::string_view reduction)
{
    if (reduction == "none") return Reduction::kNone;
    if (reduction == "sum") return Reduction::kSum;
    if (reduction == "mean") return Reduction::kMean;
    TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'none', 'sum', got '", reduction, "'");
}

namespace {

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
                  const at::Tensor &target, const std::optional<at::Tensor> &grad_rows,
                  const std::optional<at::Tensor> &ce_weight, const FusedCeOptions &o)
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
        const int64_t n = grad_rows->numel();
        TORCH_CHECK_VALUE(grad_rows->dim() <= 1 && (n == hidden.size(0) || n == 1), "grad_rows must be 1-D with 1 or ",
                          hidden.size(0), " values, got shape ", grad_rows->sizes());
    }
    if (ce_weight) {
        check_device(*ce_weight, dev, "ce_weight");
        TORCH_CHECK_TYPE(at::isFloatingType(ce_weight->scalar_type()), "ce_weight must be a floating-point tensor, got ",
                         ce_weight->scalar_type());
        TORCH_CHECK_VALUE(ce_weight->dim() == 1 && ce_weight->size(0) == weight.size(0), "ce_weight must have shape (",
                          weight.size(0), ",) (one weight per class), got ", ce_weight->sizes());
    }
    TORCH_CHECK_VALUE(o.label_smoothing >= 0.0 && o.label_smoothing <= 1.0,
                      "label_smoothing must be in [0, 1], got ", o.label_smoothing);
    TORCH_CHECK_VALUE(o.softcap >= 0.0 && std::isfinite(o.softcap),
                      "softcap must be finite and positive (or 0 for none), got ", o.softcap);
    TORCH_CHECK_VALUE(std::isfinite(o.z_loss), "z_loss must be finite, got ", o.z_loss);
    TORCH_CHECK_VALUE(!o.any_grad() || grad_rows || o.reduction != Reduction::kNone,
                      "gradients asked for with reduction 'none' need grad_rows (the upstream gradient per row)");
    TORCH_CHECK_VALUE(!o.grad_bias || bias, "grad_bias is set but bias is None");
}

// On the CPU a bad target costs nothing to find: raise. (On CUDA such rows come
// out NaN instead of forcing a host sync.)
void check_targets_on_cpu(const at::Tensor &target, int64_t vocab, int64_t ignore_index)
{
    const at::Tensor bad = (target != ignore_index).logical_and_((target < 0).logical_or_(target >= vocab));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "target must be in [0, ", vocab, ") or ignore_index (", ignore_index,
                      "), got ", target.masked_select(bad)[0].item<int64_t>());
}

// Rows per chunk: chunk_size, or as many rows of logits as fit the device's budget,
// rounded down to a multiple of kChunkRowMultiple: a GEMM tiles its rows by 64 or
// 128, and a chunk just past a multiple pays for a mostly empty tile (1046 rows, what
// 256 MiB holds at a 128K vocabulary, is 9 tiles of 128 for 8's work). On the H100
// the difference was within run-to-run noise (frozen head N16384 H4096 V128256:
// 1046 rows 57.3 ms and 1024 rows 53.6 in one run; 1024 rows 55.6 and 53.9 in the next).
// With a trained weight, also at most `hidden` rows (at least kChunkRowMultiple): a
// chunk's logits are then never larger than dW itself (rows x V against V x H), which
// the budget alone allows at a small vocabulary (N16384 H4096 V32000: one 1 GB chunk,
// twice unsloth_zoo's peak), while every extra chunk costs one more pass over dW.
constexpr int64_t kChunkRowMultiple = 128;

int64_t rows_per_chunk(const FusedCeOptions &o, const FusedCeDevice &dev, int64_t rows, int64_t vocab,
                       int64_t hidden, int64_t elem_size)
{
    int64_t chunk = o.chunk_size;
    if (chunk <= 0) {
        chunk = dev.chunk_bytes / (vocab * elem_size);
        if (o.grad_weight) chunk = std::min(chunk, std::max(hidden, kChunkRowMultiple));
        if (chunk >= kChunkRowMultiple) chunk -= chunk % kChunkRowMultiple;
    }
    return std::max<int64_t>(1, std::min(chunk, rows));
}

// The upstream factor of each row: grad_rows as given, or the reduced loss'
// own (1 for sum; for mean 1 / #counted, or 1 / the sum of the counted rows'
// class weights `weighed`); undefined when no gradient is asked for.
at::Tensor upstream_factor(const std::optional<at::Tensor> &grad_rows, const FusedCeOptions &o,
                           const at::Tensor &counted, const at::Tensor &weighed, const at::TensorOptions &fopts)
{
    if (!o.any_grad()) return {};
    if (grad_rows) return grad_rows->contiguous();
    if (o.reduction != Reduction::kMean) return at::ones({1}, fopts);
    return weighed.defined() ? weighed.reciprocal().reshape({1}) : counted.clamp_min(1).to(at::kFloat).reciprocal();
}

// What the row kernel reads besides the logits and targets (device tensors, or
// undefined): the class weights in fp32 and their sum, and the z-loss factor.
struct RowInputs {
    at::Tensor target, g, class_weight, class_weight_sum, z_loss_factor;
};

// What the row kernel writes per row (undefined where not asked for).
struct RowOutputs {
    at::Tensor loss, z_loss, accuracy, argmax;
};

// The core kernel's arguments for rows [start, start + z.size(0)) of one chunk of logits z.
slothai_fused_ce_rows_args rows_args(at::Tensor &z, const RowInputs &in, RowOutputs &out, int64_t start,
                                     const FusedCeOptions &o)
{
    slothai_fused_ce_rows_args a{};
    a.logits = z.data_ptr();
    a.dtype = core_dtype(z.scalar_type(), "hidden");
    a.rows = z.size(0);
    a.vocab = z.size(1);
    a.ld = z.stride(0);
    a.target = in.target.data_ptr<int64_t>() + start;
    a.ignore_index = o.ignore_index;
    a.label_smoothing = (float)o.label_smoothing;
    a.softcap = (float)o.softcap;
    a.z_loss = (float)o.z_loss;
    if (in.g.defined()) {
        a.grad_stride = in.g.numel() == 1 ? 0 : 1;
        a.grad = in.g.data_ptr<float>() + a.grad_stride * start;
    }
    a.loss = out.loss.data_ptr<float>() + start;
    auto ptr = [](const at::Tensor &t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    a.class_weight = ptr(in.class_weight);
    a.class_weight_sum = ptr(in.class_weight_sum);
    a.z_loss_factor = ptr(in.z_loss_factor);
    a.token_scaling = o.use_token_scaling;
    if (out.z_loss.defined()) a.z_loss_out = out.z_loss.data_ptr<float>() + start;
    if (out.accuracy.defined()) a.accuracy_out = out.accuracy.data_ptr<float>() + start;
    if (out.argmax.defined()) a.argmax_out = out.argmax.data_ptr<int64_t>() + start;
    return a;
}

// The largest multiple of 8 below an odd vocabulary V on CUDA (else 0): a GEMM
// reducing over an odd V takes a slow cuBLAS kernel (H100, N4096 H1024 V50257:
// dz W 3.2 ms, its aligned columns alone 0.5 ms), so dx = dz W goes in two, the
// aligned columns and the < 8 left (unsloth_zoo splits the same way). The logits
// GEMM z = x W^T, whose output runs over V, is as slow (4.3 ms there) and not split.
int64_t aligned_vocab(const at::Tensor &t, int64_t V)
{
    const int64_t V8 = V - V % 8;
    return t.is_cuda() && t.scalar_type() != at::kFloat && V8 != V && V8 > 0 ? V8 : 0;
}

// The rows the chunk loop runs over. Rows whose target is ignore_index contribute
// nothing (loss 0, gradient 0): where the host may wait for their count (the CPU;
// CUDA outside graph capture) only the others are computed, gathered chunk by
// chunk, so each ignored row is a row less in every GEMM (the prompt and padding
// tokens of SFT batches; unsloth_zoo skips them too). Otherwise (or when none is
// ignored) every row, in order; ignored ones come out of the row kernel as zeros.
struct Rows {
    at::Tensor index; // the counted rows (int64), or undefined: all rows
    int64_t count;

    // counts: per row, whether its target counts (target != ignore_index).
    Rows(const at::Tensor &counts, bool may_sync) : count(counts.size(0))
    {
        if (!may_sync || count == 0) return;
        at::Tensor kept = counts.nonzero().squeeze(1); // waits for the device
        if (kept.size(0) != count) index = kept, count = kept.size(0);
    }
    // Rows [start, start + n) of the set, from t (indexed by all rows).
    at::Tensor take(const at::Tensor &t, int64_t start, int64_t n) const
    {
        return index.defined() ? t.index_select(0, index.narrow(0, start, n)) : t.narrow(0, start, n);
    }
    // t's rows (rows [start, start + t.size(0)) of the set) written to their rows of `all`.
    void put(at::Tensor &all, int64_t start, const at::Tensor &t) const
    {
        all.index_copy_(0, index.narrow(0, start, t.size(0)), t);
    }
};

// The gradients of the inputs, chunk by chunk: dx rows written in place, db summed
// in fp32, dW summed either in an fp32 accumulator (rounded once at the end, as
// eager's single GEMM: V x H x 4 bytes more memory, 2.1 GB at 128K x 4096) or
// straight into dW in the input dtype (fp32_weight_grad off: cuBLAS adds each
// chunk's product in fp32 and rounds the running sum once per chunk). With a
// single chunk both are one GEMM and the same.
class GradientSums {
  public:
    GradientSums(const at::Tensor &x, const at::Tensor &w, const FusedCeOptions &o, const Rows &rows, int64_t nchunks)
        : x_(x), w_(w), o_(o), rows_(rows),
          dw_in_place_(nchunks == 1 || !o.fp32_weight_grad || x.scalar_type() == at::kFloat)
    {
        const auto fopts = x.options().dtype(at::kFloat);
        const int64_t N = x.size(0), H = x.size(1), V = w.size(0);
        if (o.grad_hidden) // a skipped row's dx is 0
            dx_ = rows.index.defined() ? at::zeros({N, H}, x.options()) : at::empty({N, H}, x.options());
        else
            dx_ = at::empty({0, 0}, x.options());
        if (o.grad_weight) {
            if (dw_in_place_)
                dw_ = rows.count > 0 ? at::empty({V, H}, x.options()) : at::zeros({V, H}, x.options());
            else
                dw_acc_ = at::zeros({V, H}, fopts);
        }
        if (o.grad_bias) db_acc_ = at::zeros({V}, fopts);
    }

    // dz: the chunk's d loss / d z (rows [start, start + dz.size(0)) of the set); xc: its hidden rows.
    void add(const at::Tensor &dz, const at::Tensor &xc, int64_t start)
    {
        if (o_.grad_hidden) {
            const bool gathered = rows_.index.defined();
            at::Tensor dxc = gathered ? at::empty_like(xc) : dx_.narrow(0, start, dz.size(0));
            const int64_t V = dz.size(1), V8 = aligned_vocab(dz, V);
            if (V8 != 0) { // split (aligned_vocab) into one fp32 sum, rounded once
                at::Tensor acc = at::zeros({dz.size(0), dxc.size(1)}, dz.options().dtype(at::kFloat));
                addmm_fp32(acc, dz.narrow(1, 0, V8), w_.narrow(0, 0, V8));
                addmm_fp32(acc, dz.narrow(1, V8, V - V8), w_.narrow(0, V8, V - V8));
                dxc.copy_(acc);
            } else {
                at::mm_out(dxc, dz, w_);
            }
            if (gathered) rows_.put(dx_, start, dxc);
        }
        if (o_.grad_weight) {
            if (!dw_in_place_)
                addmm_fp32(dw_acc_, dz.t(), xc);
            else if (start == 0)
                at::mm_out(dw_, dz.t(), xc);
            else
                dw_.addmm_(dz.t(), xc);
        }
        if (o_.grad_bias) db_acc_.add_(dz.sum(0, false, at::kFloat));
    }

    // (dx, dW, db) in the input dtype; a gradient not asked for comes back empty.
    std::tuple<at::Tensor, at::Tensor, at::Tensor> finish()
    {
        const auto opts = x_.options();
        if (dw_acc_.defined()) {
            dw_ = dw_acc_.to(x_.scalar_type());
            dw_acc_.reset();
        }
        at::Tensor dw = dw_.defined() ? dw_ : at::empty({0, 0}, opts);
        at::Tensor db = o_.grad_bias ? db_acc_.to(x_.scalar_type()) : at::empty({0}, opts);
        return {dx_, dw, db};
    }

  private:
    const at::Tensor &x_, &w_;
    const FusedCeOptions &o_;
    const Rows &rows_;
    const bool dw_in_place_;
    at::Tensor dx_, dw_, dw_acc_, db_acc_;
};

// Per-row values of the rows computed, as all N rows: the skipped ones (ignored) take `fill`.
at::Tensor all_rows(const Rows &set, const at::Tensor &computed, int64_t N, double fill)
{
    if (!set.index.defined()) return computed;
    at::Tensor all = at::full({N}, fill, computed.options());
    set.put(all, 0, computed);
    return all;
}

} // namespace

FusedCeResult fused_ce_impl(const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                            const at::Tensor &target_in, const std::optional<at::Tensor> &grad_rows,
                            const std::optional<at::Tensor> &ce_weight, const FusedCeOptions &o,
                            const FusedCeDevice &dev)
{
    check_inputs(hidden, weight, bias, target_in, grad_rows, ce_weight, o);
    const int64_t N = hidden.size(0), V = weight.size(0);
    const at::Tensor x = hidden.contiguous(), w = weight.contiguous();
    const at::Tensor target = target_in.to(at::kLong).contiguous();
    if (!x.is_cuda()) check_targets_on_cpu(target, V, o.ignore_index);

    const at::Tensor counts = target != o.ignore_index, counted = counts.sum();
    const auto fopts = x.options().dtype(at::kFloat);
    RowInputs in;
    at::Tensor weighed; // with class weights: the sum of the counted rows' w_t, mean's divisor
    if (ce_weight) {
        in.class_weight = ce_weight->to(at::kFloat).contiguous();
        // A bad target (CUDA: its row is NaN) is clamped to a class here, never read out of bounds.
        weighed = in.class_weight.index_select(0, target.clamp(0, V - 1)).mul_(counts).sum();
        if (o.label_smoothing != 0.0) in.class_weight_sum = in.class_weight.sum().reshape({1});
        // mean divides the class-weighted part by `weighed`, the z-loss part by the count
        if (o.reduction == Reduction::kMean && o.z_loss != 0.0)
            in.z_loss_factor = weighed.div(counted).reshape({1});
    }
    const at::Tensor g_all = upstream_factor(grad_rows, o, counted, weighed, fopts);

    // The rows computed (Rows), and their targets, upstream factors and per-row outputs.
    const Rows set(counts, dev.may_sync);
    const int64_t M = set.count;
    in.target = set.take(target, 0, M);
    in.g = g_all.defined() && g_all.numel() > 1 ? set.take(g_all, 0, M) : g_all;
    RowOutputs out;
    out.loss = at::empty({M}, fopts);
    if (o.return_z_loss) out.z_loss = at::empty({M}, fopts);
    if (o.return_token_accuracy) out.accuracy = at::empty({M}, fopts);
    if (o.return_predicted_tokens) out.argmax = at::empty({M}, x.options().dtype(at::kLong));

    // The logits buffer's row stride: V rounded up to 16 bytes, as cuBLAS's fast GEMM
    // kernels want aligned rows (H100, N4096 H1024 V50257 trained: 11.4 -> 9.8 ms; with
    // dx split at aligned_vocab 6.9 ms, unsloth_zoo 4.1-5.0).
    const int64_t align = 16 / x.element_size(), ld = (V + align - 1) / align * align;
    const int64_t chunk = rows_per_chunk(o, dev, M, ld, x.size(1), x.element_size());
    GradientSums grads(x, w, o, set, (M + chunk - 1) / chunk);
    {
        at::Tensor zbuf = at::empty({M > 0 ? chunk : 0, ld}, x.options()); // one chunk of logits, reused
        const at::Tensor wt = w.t();
        for (int64_t start = 0; start < M; start += chunk) {
            const int64_t rows = std::min(chunk, M - start);
            const at::Tensor xc = set.take(x, start, rows);
            at::Tensor z = zbuf.narrow(0, 0, rows).narrow(1, 0, V);
            if (bias)
                at::addmm_out(z, *bias, xc, wt);
            else
                at::mm_out(z, xc, wt);
            dev.rows(rows_args(z, in, out, start, o)); // loss rows; z becomes dz when g is defined
            if (in.g.defined()) grads.add(z, xc, start);
        }
    } // the logits buffer is freed before dW is converted

    auto [dx, dw, db] = grads.finish();
    at::Tensor loss = out.loss, z_loss = at::empty({0}, fopts), accuracy = at::empty({0}, fopts);
    at::Tensor predicted = out.argmax.defined() ? all_rows(set, out.argmax, N, -1)
                                                : at::empty({0}, x.options().dtype(at::kLong));
    if (o.reduction == Reduction::kNone) { // a skipped row's loss, z loss and accuracy are 0
        loss = all_rows(set, loss, N, 0);
        if (out.z_loss.defined()) z_loss = all_rows(set, out.z_loss, N, 0);
        if (out.accuracy.defined()) accuracy = all_rows(set, out.accuracy, N, 0);
    } else {
        // 0 / 0 = NaN when every row is ignored, as torch (accuracy: a mean for sum too, as Liger's)
        loss = loss.sum();
        if (out.z_loss.defined()) z_loss = out.z_loss.sum();
        if (out.accuracy.defined()) accuracy = out.accuracy.sum() / counted;
        if (o.reduction == Reduction::kMean) {
            loss = weighed.defined() ? loss / weighed : loss / counted;
            if (z_loss.numel() == 1) z_loss = z_loss / counted;
        }
    }
    return {loss, dx, dw, db, z_loss, accuracy, predicted};
}

namespace {

FusedCeDevice cpu_device(const FusedCeOptions &)
{
    FusedCeDevice dev;
    dev.chunk_bytes = int64_t(64) << 20;
    dev.may_sync = true;
    dev.rows = [](const slothai_fused_ce_rows_args &a) {
        at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
            check_status(slothai_fused_ce_rows_cpu(&a, begin, end), "fused_ce rows (cpu)");
        });
    };
    return dev;
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CPU, m) { m.impl("fused_ce", &fused_ce_kernel<cpu_device>); }

} // namespace slothai
