"""slothai::fused_ce's kernel (CPU and CUDA): linear + cross-entropy that never holds
more than one chunk of logits. Per chunk c of the rows computed (Rows: those whose
target counts, where the host may wait for their number; 3 GEMMs with gradients):

    z_c   = x_c W^T (+ b)                      [rows x V, input dtype]
    loss_c, dz_c (in place of z_c)             the core's row kernel, fp32 math
    dx_c  = dz_c W                             into its rows of dX (skipped rows: 0)
    dW   += dz_c^T x_c                         fp32 accumulator across chunks, or
                                               the input dtype (fp32_weight_grad off)
    db   += sum_rows dz_c                      fp32

The gradients asked for (grad_* flags) are formed for per-row upstream factors
(grad_rows; the backward of reduction none passes them) or, with reduction sum /
mean, for the reduced loss' own upstream 1 (mean: 1 / #counted rows, or 1 / the
sum of their targets' class weights, read on the device, no host sync); autograd
multiplies in the real one. The z loss, token accuracy and predicted tokens asked
for come out of the row kernel (no pass of their own) and are reduced here, on
the device. The GEMMs are torch's (cuBLAS on CUDA); the per-call host cost of a
Python loop is nothing against one chunk's GEMMs. Fake function and autograd:
fused_ce.py; the reasoning: docs/design.md.
"""
import math

import torch

from .. import _C
from . import kernels
from .kernels import check_device, check_dtype, ptr
from .library import register_kernel

REDUCTIONS = ("mean", "none", "sum")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")

# Rows per chunk: chunk_size, or as many rows of logits as fit the device's budget,
# rounded down to a multiple of CHUNK_ROW_MULTIPLE: a GEMM tiles its rows by 64 or
# 128, and a chunk just past a multiple pays for a mostly empty tile (1046 rows, what
# 256 MiB holds at a 128K vocabulary, is 9 tiles of 128 for 8's work). On the H100
# the difference was within run-to-run noise (frozen head N16384 H4096 V128256:
# 1046 rows 57.3 ms and 1024 rows 53.6 in one run; 1024 rows 55.6 and 53.9 in the next).
# With a trained weight, also at most `hidden` rows (at least CHUNK_ROW_MULTIPLE): a
# chunk's logits are then never larger than dW itself (rows x V against V x H), which
# the budget alone allows at a small vocabulary (N16384 H4096 V32000: one 1 GB chunk,
# twice unsloth_zoo's peak), while every extra chunk costs one more pass over dW.
CHUNK_ROW_MULTIPLE = 128
CPU_CHUNK_BYTES = 64 << 20


def _cuda_chunk_bytes(device, grad_weight):
    """The logits budget on CUDA, capped at an eighth of what is free. A frozen weight:
    256 MiB (1K rows at a 128K vocabulary; H100, N=16384 H=4096 V=128256: 53.0 ms /
    0.54 GB with 1K-row chunks, 54.7 ms / 0.67 GB with 512 MiB ones). A trained one:
    1 GiB, since every chunk also reads and writes the dW sum (8 bytes per weight
    element in fp32, 4 in bf16), so fewer chunks move fewer bytes (same shape, fp32:
    84.1 ms with 1 GiB chunks, 97.8 ms with 1K-row ones) and, in bf16, round fewer
    times; rows_per_chunk caps such a chunk at `hidden` rows."""
    free = torch.cuda.mem_get_info(device)[0]
    cap = (1 << 30) if grad_weight else (256 << 20)
    return max(64 << 20, min(cap, free // 8))


def rows_per_chunk(chunk_size, chunk_bytes, grad_weight, rows, vocab, hidden, elem_size):
    chunk = chunk_size
    if chunk <= 0:
        chunk = chunk_bytes // (vocab * elem_size)
        if grad_weight:
            chunk = min(chunk, max(hidden, CHUNK_ROW_MULTIPLE))
        if chunk >= CHUNK_ROW_MULTIPLE:
            chunk -= chunk % CHUNK_ROW_MULTIPLE
    return max(1, min(chunk, rows))


def _check_inputs(hidden, weight, bias, target, grad_rows, ce_weight, o):
    dev = hidden.device
    kernels.core_dtype(hidden.dtype, "hidden")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (tokens, hidden), got {hidden.dim()}-D")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (vocab, hidden), got {weight.dim()}-D")
    check_device(weight, dev, "weight")
    check_dtype(weight, hidden.dtype, "weight")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} columns but hidden has size {hidden.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary entry)")
    if bias is not None:
        check_device(bias, dev, "bias")
        check_dtype(bias, hidden.dtype, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {list(bias.shape)}")
    check_device(target, dev, "target")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32, got {kernels.dtype_name(target.dtype)}")
    if target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(f"target must have shape ({hidden.shape[0]},) to match hidden, got {list(target.shape)}")
    if grad_rows is not None:
        check_device(grad_rows, dev, "grad_rows")
        check_dtype(grad_rows, torch.float32, "grad_rows")
        if grad_rows.dim() > 1 or grad_rows.numel() not in (1, hidden.shape[0]):
            raise ValueError(f"grad_rows must be 1-D with 1 or {hidden.shape[0]} values, got shape "
                             f"{list(grad_rows.shape)}")
    if ce_weight is not None:
        check_device(ce_weight, dev, "ce_weight")
        if not ce_weight.dtype.is_floating_point:
            raise TypeError(f"ce_weight must be a floating-point tensor, got {kernels.dtype_name(ce_weight.dtype)}")
        if ce_weight.dim() != 1 or ce_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ce_weight must have shape ({weight.shape[0]},) (one weight per class), got "
                             f"{list(ce_weight.shape)}")
    check_reduction(o["reduction"])
    if not 0.0 <= o["label_smoothing"] <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {o['label_smoothing']}")
    if not (o["softcap"] >= 0.0 and math.isfinite(o["softcap"])):
        raise ValueError(f"softcap must be finite and positive (or 0 for none), got {o['softcap']}")
    if not math.isfinite(o["z_loss"]):
        raise ValueError(f"z_loss must be finite, got {o['z_loss']}")
    if o["any_grad"] and grad_rows is None and o["reduction"] == "none":
        raise ValueError("gradients asked for with reduction 'none' need grad_rows (the upstream gradient per row)")
    if o["grad_bias"] and bias is None:
        raise ValueError("grad_bias is set but bias is None")


def _check_targets_on_cpu(target, vocab, ignore_index):
    """On the CPU a bad target costs nothing to find: raise. (On CUDA such rows come
    out NaN instead of forcing a host sync.)"""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        raise ValueError(f"target must be in [0, {vocab}) or ignore_index ({ignore_index}), got "
                         f"{int(target[bad][0])}")


class Rows:
    """The rows the chunk loop runs over. Rows whose target is ignore_index contribute
    nothing (loss 0, gradient 0): where the host may wait for their count (the CPU;
    CUDA outside graph capture) only the others are computed, gathered chunk by
    chunk, so each ignored row is a row less in every GEMM (the prompt and padding
    tokens of SFT batches; unsloth_zoo skips them too). Otherwise (or when none is
    ignored) every row, in order; ignored ones come out of the row kernel as zeros."""

    def __init__(self, counts, may_sync):
        self.index, self.count = None, counts.shape[0]  # index: the counted rows (int64), or None: all rows
        if may_sync and self.count:
            kept = counts.nonzero().squeeze(1)  # waits for the device
            if kept.shape[0] != self.count:
                self.index, self.count = kept, kept.shape[0]

    def take(self, t, start, n):
        """Rows [start, start + n) of the set, from t (indexed by all rows)."""
        return t.narrow(0, start, n) if self.index is None else t.index_select(0, self.index.narrow(0, start, n))

    def put(self, all_rows, start, t):
        """t's rows (rows [start, start + len(t)) of the set) written to their rows of all_rows."""
        all_rows.index_copy_(0, self.index.narrow(0, start, t.shape[0]), t)

    def all(self, computed, n, fill):
        """Per-row values of the rows computed, as all n rows: the skipped ones take `fill`."""
        if self.index is None:
            return computed
        out = computed.new_full((n,), fill)
        self.put(out, 0, computed)
        return out


def _addmm_fp32(dst, a, b):
    """dst += a @ b with an fp32 dst and half-precision a, b: cuBLAS accumulates in
    fp32 and adds into fp32 on CUDA; the CPU path upcasts."""
    if a.dtype == torch.float32:
        dst.addmm_(a, b)
    elif dst.is_cuda:
        torch.ops.aten.addmm.dtype_out(dst, a, b, torch.float32, out=dst)
    else:
        dst.addmm_(a.float(), b.float())


def _aligned_vocab(t, vocab):
    """The largest multiple of 8 below an odd vocabulary V on CUDA (else 0): a GEMM
    reducing over an odd V takes a slow cuBLAS kernel (H100, N4096 H1024 V50257:
    dz W 3.2 ms, its aligned columns alone 0.5 ms), so dx = dz W goes in two, the
    aligned columns and the < 8 left (unsloth_zoo splits the same way). The logits
    GEMM z = x W^T, whose output runs over V, is as slow (4.3 ms there) and not split."""
    v8 = vocab - vocab % 8
    return v8 if t.is_cuda and t.dtype != torch.float32 and 0 < v8 != vocab else 0


class GradientSums:
    """The gradients of the inputs, chunk by chunk: dx rows written in place, db summed
    in fp32, dW summed either in an fp32 accumulator (rounded once at the end, as
    eager's single GEMM: V x H x 4 bytes more memory, 2.1 GB at 128K x 4096) or
    straight into dW in the input dtype (fp32_weight_grad off: cuBLAS adds each
    chunk's product in fp32 and rounds the running sum once per chunk). With a
    single chunk both are one GEMM and the same."""

    def __init__(self, x, w, o, rows, nchunks):
        self.x, self.w, self.o, self.rows = x, w, o, rows
        n, h, v = x.shape[0], x.shape[1], w.shape[0]
        self.dw_in_place = nchunks == 1 or not o["fp32_weight_grad"] or x.dtype == torch.float32
        self.dx = self.dw = self.dw_acc = self.db_acc = None
        if o["grad_hidden"]:  # a skipped row's dx is 0
            self.dx = x.new_zeros((n, h)) if rows.index is not None else x.new_empty((n, h))
        if o["grad_weight"]:
            if not self.dw_in_place:
                self.dw_acc = x.new_zeros((v, h), dtype=torch.float32)
            else:
                self.dw = x.new_empty((v, h)) if rows.count > 0 else x.new_zeros((v, h))
        if o["grad_bias"]:
            self.db_acc = x.new_zeros((v,), dtype=torch.float32)

    def add(self, dz, xc, start):
        """dz: the chunk's d loss / d z (rows [start, start + len(dz)) of the set); xc: its hidden rows."""
        if self.o["grad_hidden"]:
            gathered = self.rows.index is not None
            dxc = torch.empty_like(xc) if gathered else self.dx.narrow(0, start, dz.shape[0])
            v = dz.shape[1]
            v8 = _aligned_vocab(dz, v)
            if v8:  # split (_aligned_vocab) into one fp32 sum, rounded once
                acc = dz.new_zeros((dz.shape[0], dxc.shape[1]), dtype=torch.float32)
                _addmm_fp32(acc, dz.narrow(1, 0, v8), self.w.narrow(0, 0, v8))
                _addmm_fp32(acc, dz.narrow(1, v8, v - v8), self.w.narrow(0, v8, v - v8))
                dxc.copy_(acc)
            else:
                torch.mm(dz, self.w, out=dxc)
            if gathered:
                self.rows.put(self.dx, start, dxc)
        if self.o["grad_weight"]:
            if not self.dw_in_place:
                _addmm_fp32(self.dw_acc, dz.t(), xc)
            elif start == 0:
                torch.mm(dz.t(), xc, out=self.dw)
            else:
                self.dw.addmm_(dz.t(), xc)
        if self.o["grad_bias"]:
            self.db_acc.add_(dz.sum(0, dtype=torch.float32))

    def finish(self):
        """(dx, dW, db) in the input dtype; a gradient not asked for comes back empty."""
        x = self.x
        if self.dw_acc is not None:
            self.dw, self.dw_acc = self.dw_acc.to(x.dtype), None
        dx = self.dx if self.dx is not None else x.new_empty((0, 0))
        dw = self.dw if self.dw is not None else x.new_empty((0, 0))
        db = self.db_acc.to(x.dtype) if self.db_acc is not None else x.new_empty((0,))
        return dx, dw, db


def _kernel(hidden, *args, **kwargs):
    """The op's kernel, on CUDA with hidden's device current (the capture check and the
    free-memory budget ask the current device)."""
    if hidden.is_cuda:
        with torch.cuda.device(hidden.device):
            return _fused_ce(hidden, *args, **kwargs)
    return _fused_ce(hidden, *args, **kwargs)


def _fused_ce(hidden, weight, bias, target, grad_rows, ignore_index, label_smoothing, softcap, z_loss, reduction,
              chunk_size, grad_hidden, grad_weight, grad_bias, fp32_weight_grad, ce_weight=None,
              use_token_scaling=False, return_z_loss=False, return_token_accuracy=False,
              return_predicted_tokens=False):
    o = dict(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
             grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias, fp32_weight_grad=fp32_weight_grad,
             any_grad=grad_hidden or grad_weight or grad_bias)
    _check_inputs(hidden, weight, bias, target, grad_rows, ce_weight, o)
    dev = hidden.device
    n, v = hidden.shape[0], weight.shape[0]
    x, w = hidden.contiguous(), weight.contiguous()
    target = target.to(torch.int64).contiguous()
    if dev.type == "cpu":
        _check_targets_on_cpu(target, v, ignore_index)
        chunk_bytes, may_sync = CPU_CHUNK_BYTES, True
    else:
        chunk_bytes = _cuda_chunk_bytes(dev, grad_weight)
        # Counting the rows to skip waits for the device, which a stream being captured
        # into a CUDA graph must not: there every row is computed.
        may_sync = not torch.cuda.is_current_stream_capturing()

    counts = target != ignore_index
    counted = counts.sum()
    class_weight = class_weight_sum = z_loss_factor = weighed = None  # weighed: mean's divisor with class weights
    if ce_weight is not None:
        class_weight = ce_weight.to(torch.float32).contiguous()
        # A bad target (CUDA: its row is NaN) is clamped to a class here, never read out of bounds.
        weighed = class_weight.index_select(0, target.clamp(0, v - 1)).mul_(counts).sum()
        if label_smoothing != 0.0:
            class_weight_sum = class_weight.sum().reshape(1)
        if reduction == "mean" and z_loss != 0.0:  # mean divides the class-weighted part by weighed, z by the count
            z_loss_factor = weighed.div(counted).reshape(1)
    # The upstream factor of each row: grad_rows as given, or the reduced loss' own
    # (1 for sum; for mean 1 / #counted, or 1 / the sum of their class weights).
    g_all = None
    if o["any_grad"]:
        if grad_rows is not None:
            g_all = grad_rows.contiguous()
        elif reduction != "mean":
            g_all = x.new_ones((1,), dtype=torch.float32)
        else:
            g_all = weighed.reciprocal().reshape(1) if weighed is not None else counted.clamp_min(1).float().reciprocal()

    rows = Rows(counts, may_sync)
    m = rows.count
    tgt = rows.take(target, 0, m)
    g = rows.take(g_all, 0, m) if g_all is not None and g_all.numel() > 1 else g_all
    f32 = dict(dtype=torch.float32)
    loss = x.new_empty((m,), **f32)
    z_out = x.new_empty((m,), **f32) if return_z_loss else None
    acc_out = x.new_empty((m,), **f32) if return_token_accuracy else None
    arg_out = x.new_empty((m,), dtype=torch.int64) if return_predicted_tokens else None

    # The logits buffer's row stride: V rounded up to 16 bytes, as cuBLAS's fast GEMM
    # kernels want aligned rows (H100, N4096 H1024 V50257 trained: 11.4 -> 9.8 ms; with
    # dx split at _aligned_vocab 6.9 ms, unsloth_zoo 4.1-5.0).
    align = 16 // x.element_size()
    ld = -(-v // align) * align
    chunk = rows_per_chunk(chunk_size, chunk_bytes, grad_weight, m, ld, x.shape[1], x.element_size())
    grads = GradientSums(x, w, o, rows, -(-m // chunk))
    dtype = kernels.DTYPES[x.dtype]
    grad_stride = 0 if g is None or g.numel() == 1 else 1
    zbuf = x.new_empty((chunk if m > 0 else 0, ld))  # one chunk of logits, reused
    xc = z = None
    wt = w.t()

    def at(t, start, stride=1):  # t's pointer at a chunk's first row (0 for None)
        return 0 if t is None else t.data_ptr() + start * stride * t.element_size()

    for start in range(0, m, chunk):
        r = min(chunk, m - start)
        xc = rows.take(x, start, r)
        z = zbuf.narrow(0, 0, r).narrow(1, 0, v)
        if bias is not None:
            torch.addmm(bias, xc, wt, out=z)
        else:
            torch.mm(xc, wt, out=z)
        # loss rows; z becomes dz when g is given (slothai_fused_ce_rows_args, in order)
        kernels.launch(_C.fused_ce_rows, dev, z.data_ptr(), dtype, r, v, z.stride(0), at(tgt, start), ignore_index,
                       label_smoothing, softcap, z_loss, at(g, start, grad_stride), grad_stride, at(loss, start),
                       ptr(class_weight), ptr(class_weight_sum), ptr(z_loss_factor), int(use_token_scaling),
                       at(z_out, start), at(acc_out, start), at(arg_out, start))
        if g is not None:
            grads.add(z, xc, start)
    del zbuf, xc, z  # the logits buffer is freed before dW is converted

    dx, dw, db = grads.finish()
    z_loss_v, accuracy = x.new_empty((0,), **f32), x.new_empty((0,), **f32)
    predicted = rows.all(arg_out, n, -1) if arg_out is not None else x.new_empty((0,), dtype=torch.int64)
    if reduction == "none":  # a skipped row's loss, z loss and accuracy are 0
        loss = rows.all(loss, n, 0)
        if z_out is not None:
            z_loss_v = rows.all(z_out, n, 0)
        if acc_out is not None:
            accuracy = rows.all(acc_out, n, 0)
    else:
        # 0 / 0 = NaN when every row is ignored, as torch (accuracy: a mean for sum too, as Liger's)
        loss = loss.sum()
        if z_out is not None:
            z_loss_v = z_out.sum()
        if acc_out is not None:
            accuracy = acc_out.sum() / counted
        if reduction == "mean":
            loss = loss / weighed if weighed is not None else loss / counted
            if z_out is not None:
                z_loss_v = z_loss_v / counted
    return loss, dx, dw, db, z_loss_v, accuracy, predicted


register_kernel("fused_ce", _kernel)
