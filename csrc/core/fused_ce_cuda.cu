/*
 * Cross-entropy rows on CUDA. Formula: slothai_fused_ce_rows_args in slothai.h.
 *
 * Work split: one thread block (kThreads) per row. Pass 1 reads the row once
 * and keeps, per thread, an online (max, sum of exp) pair, the sum of y for
 * label smoothing (of w_j y_j with class weights) and, when an argmax is asked
 * for (token accuracy, predicted tokens), the index of its running max; a block
 * reduction combines them into lse and the row's argmax (a row with a NaN in it,
 * whose sum comes out NaN, is read once more for its first NaN, torch.argmax's
 * answer). Pass 2 (only with a gradient) reads the row again, mostly from L2, and
 * writes dz in place.
 * Rows that can be read 16 bytes at a time (vocabulary and row stride a multiple
 * of 16 / sizeof(T) elements: 8 for fp16 / bf16, 4 for fp32; logits 16-byte
 * aligned) move 16 bytes per load/store; others one element at a time, still
 * coalesced.
 *
 * The options past the plain loss are template parameters where they touch
 * every element (the argmax: kArgmax; class weights with label smoothing, whose
 * terms are per class: kClassSmooth) and per-row scalars otherwise (class weights
 * without smoothing, token scaling, the z-loss factor, the per-row outputs), so
 * the plain loss runs the same instructions per element as without them.
 *
 * Traffic per row: 2 x vocab x sizeof(T) read + vocab x sizeof(T) written with
 * a gradient (vocab x sizeof(T) read without); with class weights and smoothing
 * also vocab x 4 bytes of weights per pass (from L2: one copy for every row).
 * Memory-bound; exp and tanh are cheap next to it. Ignored rows skip pass 1 and
 * only write zeros.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include "half_cuda.cuh"
#include "slothai.h"

namespace {

constexpr int kThreads = 512;

using slothai_cuda::from_f;
using slothai_cuda::to_f;
using slothai_cuda::Vec;

// Pass 1's running state. With kArgmax also the index of the running max's first
// occurrence (kNone: no number above -inf seen yet).
template <bool kArgmax> struct Stats {
    float m, s, sum_y; // running max, sum of exp(y - m), sum of y (of w_j y_j)
};
template <> struct Stats<true> {
    float m, s, sum_y;
    long long idx;
};

constexpr long long kNone = 0x7fffffffffffffffLL;

template <bool kArgmax> __device__ __forceinline__ Stats<kArgmax> empty_stats()
{
    Stats<kArgmax> st;
    st.m = -INFINITY;
    st.s = 0.0f;
    st.sum_y = 0.0f;
    if constexpr (kArgmax) st.idx = kNone;
    return st;
}

// The online form of the C reference's sum of exp(y - max), with its answers at
// infinities: a -inf adds 0 (also while the running max is still -inf, where
// exp(y - m) would be exp(-inf + inf) = NaN); a +inf makes the sum NaN (the
// reference's exp(inf - inf), as torch's log_softmax); a NaN makes it NaN.
// wy: y's term of the smoothing sum (y, or w_j y_j). The argmax rides on the max:
// j (increasing within a thread) is kept when y is a new strict maximum, so the
// first of equal maxima stays; NaNs never become the max (the row's NaN sum sends
// it to first_nan below).
template <bool kArgmax>
__device__ __forceinline__ void add(Stats<kArgmax> &a, float y, float wy, long long j)
{
    if (y > a.m) {
        a.s = a.s * expf(a.m - y) + (y == INFINITY ? NAN : 1.0f);
        a.m = y;
        if constexpr (kArgmax) a.idx = j;
    } else if (y != -INFINITY) {
        a.s += expf(y - a.m);
    }
    a.sum_y += wy;
}

template <bool kArgmax> __device__ __forceinline__ Stats<kArgmax> merge(Stats<kArgmax> a, Stats<kArgmax> b)
{
    Stats<kArgmax> r = a;
    // A side whose max is still -inf has s = 0, or NaN if it saw a NaN: keep that.
    if (b.m == -INFINITY) {
        r.s = a.s + b.s;
        r.sum_y = a.sum_y + b.sum_y;
    } else if (a.m == -INFINITY) {
        r.m = b.m;
        r.s = b.s + a.s;
        r.sum_y = b.sum_y + a.sum_y;
    } else {
        const float m = fmaxf(a.m, b.m);
        r.m = m;
        r.s = a.s * expf(a.m - m) + b.s * expf(b.m - m);
        r.sum_y = a.sum_y + b.sum_y;
    }
    if constexpr (kArgmax) r.idx = a.m > b.m ? a.idx : b.m > a.m ? b.idx : min(a.idx, b.idx);
    return r;
}

template <bool kArgmax> __device__ __forceinline__ Stats<kArgmax> shfl_xor(const Stats<kArgmax> &st, int o)
{
    Stats<kArgmax> r;
    r.m = __shfl_xor_sync(0xffffffffu, st.m, o);
    r.s = __shfl_xor_sync(0xffffffffu, st.s, o);
    r.sum_y = __shfl_xor_sync(0xffffffffu, st.sum_y, o);
    if constexpr (kArgmax) r.idx = __shfl_xor_sync(0xffffffffu, st.idx, o);
    return r;
}

template <bool kArgmax> __device__ Stats<kArgmax> block_reduce(Stats<kArgmax> st)
{
    __shared__ Stats<kArgmax> warp_stats[kThreads / 32];
    __shared__ Stats<kArgmax> result;
    for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_stats[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < kThreads / 32 ? warp_stats[lane] : empty_stats<kArgmax>();
        for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
        if (lane == 0) result = st;
    }
    __syncthreads();
    return result;
}

// The index of the row's first NaN (kNone: none), by the whole block: an extra read
// of the row, only for a row whose sum of exponentials came out NaN (a NaN or a +inf
// in it), where torch.argmax answers the first NaN.
template <typename T> __device__ long long first_nan(const T *row, int64_t V)
{
    __shared__ long long warp_min[kThreads / 32];
    __shared__ long long result;
    long long first = kNone;
    for (int64_t j = threadIdx.x; j < V; j += kThreads)
        if (isnan(to_f(row[j]))) {
            first = j;
            break;
        }
    for (int o = 16; o > 0; o >>= 1) first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_min[warp] = first;
    __syncthreads();
    if (warp == 0) {
        first = lane < kThreads / 32 ? warp_min[lane] : kNone;
        for (int o = 16; o > 0; o >>= 1) first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
        if (lane == 0) result = first;
    }
    __syncthreads();
    return result;
}

// y = cap * tanh(z / cap), or z: a template parameter so that each per-element loop
// below exists in a version without the cap (no branch per element; nvcc unswitches
// the loops on a runtime cap only while the kernel is small).
template <bool kCap> __device__ __forceinline__ float capped(float z, float cap)
{
    if constexpr (kCap)
        return cap * tanhf(z / cap);
    else
        return z;
}

// Pass 1 over a row: this thread's share of (max, sum of exp, smoothing sum[, argmax]).
template <typename T, bool kArgmax, bool kClassSmooth, bool kCap>
__device__ __forceinline__ Stats<kArgmax> row_stats(const T *row, int64_t V, float cap, const float *w, bool vec_ok)
{
    constexpr int kVec = 16 / sizeof(T);
    auto smooth_term = [w](float y, int64_t j) {
        if constexpr (kClassSmooth)
            return w[j] * y;
        else
            return y;
    };
    Stats<kArgmax> st = empty_stats<kArgmax>();
    if (vec_ok) {
        const Vec<T> *rv = reinterpret_cast<const Vec<T> *>(row);
        for (int64_t i = threadIdx.x; i < V / kVec; i += kThreads) {
            const Vec<T> x = rv[i];
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
                const float y = capped<kCap>(to_f(x.v[k]), cap);
                add(st, y, smooth_term(y, i * kVec + k), i * kVec + k);
            }
        }
    } else {
        for (int64_t j = threadIdx.x; j < V; j += kThreads) {
            const float y = capped<kCap>(to_f(row[j]), cap);
            add(st, y, smooth_term(y, j), j);
        }
    }
    return st;
}

// Pass 2 over a row, in place: dz_j = (p_j c1 - smooth (x w_j with kClassSmooth)
// - [j == t] hit) times the cap's slope (c1, smooth, hit: the row's factors, g included).
template <typename T, bool kClassSmooth, bool kCap>
__device__ __forceinline__ void row_gradient(T *row, int64_t V, float cap, const float *w, bool vec_ok, int64_t t,
                                             float lse, float c1, float smooth, float hit)
{
    constexpr int kVec = 16 / sizeof(T);
    auto grad_of = [&](float z, int64_t j) {
        const float y = capped<kCap>(z, cap);
        float sm = smooth;
        if constexpr (kClassSmooth) sm *= w[j];
        float d = expf(y - lse) * c1 - sm - (j == t ? hit : 0.0f);
        if constexpr (kCap) d *= 1.0f - (y / cap) * (y / cap);
        return d;
    };
    if (vec_ok) {
        Vec<T> *rv = reinterpret_cast<Vec<T> *>(row);
        for (int64_t i = threadIdx.x; i < V / kVec; i += kThreads) {
            Vec<T> x = rv[i];
#pragma unroll
            for (int k = 0; k < kVec; ++k) x.v[k] = from_f<T>(grad_of(to_f(x.v[k]), i * kVec + k));
            rv[i] = x;
        }
    } else {
        for (int64_t j = threadIdx.x; j < V; j += kThreads) row[j] = from_f<T>(grad_of(to_f(row[j]), j));
    }
}

template <typename T, bool kArgmax, bool kClassSmooth>
__global__ void __launch_bounds__(kThreads) fused_ce_rows_kernel(slothai_fused_ce_rows_args a, bool vec_ok)
{
    const int64_t r = blockIdx.x;
    const int64_t V = a.vocab;
    T *row = static_cast<T *>(a.logits) + r * a.ld;
    const int64_t t = a.target[r];
    const float cap = a.softcap;
    const float *w = a.class_weight;
    auto y_of = [cap](float z) { return cap > 0.0f ? cap * tanhf(z / cap) : z; };

    if (t == a.ignore_index || t < 0 || t >= V) {
        const float v = t == a.ignore_index ? 0.0f : NAN;
        if (threadIdx.x == 0) {
            a.loss[r] = v;
            if (a.z_loss_out) a.z_loss_out[r] = v;
            if (a.accuracy_out) a.accuracy_out[r] = v;
            if (a.argmax_out) a.argmax_out[r] = -1;
        }
        if (a.grad)
            for (int64_t j = threadIdx.x; j < V; j += kThreads) row[j] = from_f<T>(v);
        return;
    }

    Stats<kArgmax> st = cap > 0.0f ? row_stats<T, kArgmax, kClassSmooth, true>(row, V, cap, w, vec_ok)
                                   : row_stats<T, kArgmax, kClassSmooth, false>(row, V, cap, w, vec_ok);
    st = block_reduce(st);
    const float lse = st.m + logf(st.s);
    long long argmax = 0;
    if constexpr (kArgmax) {
        // torch.argmax: the first NaN if any, else the first maximum (all -inf: 0)
        const long long nan_at = isnan(st.s) ? first_nan(row, V) : kNone; // st.s: the same in every thread
        argmax = nan_at != kNone ? nan_at : st.idx != kNone ? st.idx : 0;
    }
    const float eps = a.label_smoothing;
    const float f = a.z_loss_factor ? *a.z_loss_factor : 1.0f;
    const float wt = w ? w[t] : 1.0f;
    const float wsum = kClassSmooth ? *a.class_weight_sum : 0.0f;
    // Token scaling's s = p_t, in every thread (for the gradient): each reads row[t]
    // here, before the barrier that precedes the in-place writes.
    const float sc = a.token_scaling ? expf(y_of(to_f(row[t])) - lse) : 1.0f;
    if (threadIdx.x == 0) {
        const float yt = y_of(to_f(row[t]));
        // Terms whose factor is 0 left out, as the C reference (a -inf logit: 0 * inf).
        float loss = w ? wt * (1.0f - eps) * (lse - yt) : (1.0f - eps) * (lse - yt);
        if (eps != 0.0f)
            loss += w ? eps / (float)V * (lse * wsum - st.sum_y) : eps * (lse - st.sum_y / (float)V);
        const float zl = a.z_loss != 0.0f ? a.z_loss * lse * lse : 0.0f;
        if (a.z_loss != 0.0f) loss += f * zl;
        if (a.token_scaling) loss *= sc;
        a.loss[r] = loss;
        if (a.z_loss_out) a.z_loss_out[r] = a.token_scaling ? sc * zl : zl;
        if constexpr (kArgmax) {
            if (a.argmax_out) a.argmax_out[r] = argmax;
            if (a.accuracy_out) a.accuracy_out[r] = argmax == t ? 1.0f : 0.0f;
        }
    }
    if (!a.grad) return;
    // Every thread has read row[t] (thread 0, or all with token scaling) or is past
    // pass 1: the block reduction's barrier and this one order those reads before
    // the in-place writes below.
    __syncthreads();

    const float g = a.token_scaling ? a.grad[r * a.grad_stride] * sc : a.grad[r * a.grad_stride];
    float c1, hit;
    if (w) {
        c1 = (wt * (1.0f - eps) + (eps != 0.0f ? eps / (float)V * wsum : 0.0f) + 2.0f * a.z_loss * f * lse) * g;
        hit = wt * (1.0f - eps) * g;
    } else {
        c1 = (1.0f + 2.0f * a.z_loss * f * lse) * g;
        hit = (1.0f - eps) * g;
    }
    const float smooth = eps / (float)V * g; // times w_j with kClassSmooth
    if (cap > 0.0f)
        row_gradient<T, kClassSmooth, true>(row, V, cap, w, vec_ok, t, lse, c1, smooth, hit);
    else
        row_gradient<T, kClassSmooth, false>(row, V, cap, w, vec_ok, t, lse, c1, smooth, hit);
}

template <typename T, bool kArgmax, bool kClassSmooth>
void launch(const slothai_fused_ce_rows_args &a, bool vec_ok, cudaStream_t s)
{
    fused_ce_rows_kernel<T, kArgmax, kClassSmooth><<<(unsigned)a.rows, kThreads, 0, s>>>(a, vec_ok);
}

// One of the four variants of the kernel for T (slothai.h: which options touch every element).
template <typename T> void launch(const slothai_fused_ce_rows_args &a, bool vec_ok, cudaStream_t s)
{
    const bool argmax = a.argmax_out || a.accuracy_out;
    const bool class_smooth = a.class_weight && a.label_smoothing != 0.0f;
    if (argmax)
        class_smooth ? launch<T, true, true>(a, vec_ok, s) : launch<T, true, false>(a, vec_ok, s);
    else
        class_smooth ? launch<T, false, true>(a, vec_ok, s) : launch<T, false, false>(a, vec_ok, s);
}

} // namespace

extern "C" slothai_status slothai_fused_ce_rows_cuda(const slothai_fused_ce_rows_args *a, void *stream)
{
    if (!a || a->vocab <= 0 || a->ld < a->vocab || a->rows < 0 || a->rows > 0x7fffffff) return SLOTHAI_EINVAL;
    if (a->class_weight && a->label_smoothing != 0.0f && !a->class_weight_sum) return SLOTHAI_EINVAL;
    if (a->rows == 0) return SLOTHAI_OK;
    const size_t esize = a->dtype == SLOTHAI_FLOAT32 ? 4 : 2;
    const int64_t per_vec = 16 / (int64_t)esize;
    const bool vec_ok = a->vocab % per_vec == 0 && a->ld % per_vec == 0 &&
                        reinterpret_cast<uintptr_t>(a->logits) % 16 == 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (a->dtype) {
    case SLOTHAI_FLOAT32: launch<float>(*a, vec_ok, s); break;
    case SLOTHAI_FLOAT16: launch<__half>(*a, vec_ok, s); break;
    case SLOTHAI_BFLOAT16: launch<__nv_bfloat16>(*a, vec_ok, s); break;
    default: return SLOTHAI_EINVAL;
    }
    return cudaGetLastError() == cudaSuccess ? SLOTHAI_OK : SLOTHAI_ECUDA;
}
