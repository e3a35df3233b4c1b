/*
 * Cross-entropy rows on CUDA. Formula: slothai_fused_ce_rows_args in slothai.h.
 *
 * Work split: one thread block (kThreads) per row. Pass 1 reads the row once
 * and keeps, per thread, an online (max, sum of exp) pair and the sum of y for
 * label smoothing; a block reduction combines them into lse. Pass 2 (only with
 * a gradient) reads the row again, mostly from L2, and writes dz in place.
 * Rows that can be read 16 bytes at a time (vocabulary and row stride a multiple
 * of 16 / sizeof(T) elements: 8 for fp16 / bf16, 4 for fp32; logits 16-byte
 * aligned) move 16 bytes per load/store; others one element at a time, still
 * coalesced.
 *
 * Traffic per row: 2 x vocab x sizeof(T) read + vocab x sizeof(T) written with
 * a gradient (vocab x sizeof(T) read without). Memory-bound; exp and tanh are
 * cheap next to it. Ignored rows skip pass 1 and only write zeros.
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

struct Stats {
    float m, s, sum_y; // running max, sum of exp(y - m), sum of y
};

// The online form of the C reference's sum of exp(y - max), with its answers at
// infinities: a -inf adds 0 (also while the running max is still -inf, where
// exp(y - m) would be exp(-inf + inf) = NaN); a +inf makes the sum NaN (the
// reference's exp(inf - inf), as torch's log_softmax); a NaN makes it NaN.
__device__ __forceinline__ void add(Stats &a, float y)
{
    if (y > a.m) {
        a.s = a.s * expf(a.m - y) + (y == INFINITY ? NAN : 1.0f);
        a.m = y;
    } else if (y != -INFINITY) {
        a.s += expf(y - a.m);
    }
    a.sum_y += y;
}

__device__ __forceinline__ Stats merge(Stats a, Stats b)
{
    // A side whose max is still -inf has s = 0, or NaN if it saw a NaN: keep that.
    if (b.m == -INFINITY) { a.s += b.s; a.sum_y += b.sum_y; return a; }
    if (a.m == -INFINITY) { b.s += a.s; b.sum_y += a.sum_y; return b; }
    const float m = fmaxf(a.m, b.m);
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m), a.sum_y + b.sum_y};
}

__device__ Stats block_reduce(Stats st)
{
    __shared__ Stats warp_stats[kThreads / 32];
    __shared__ Stats result;
    for (int o = 16; o > 0; o >>= 1) {
        Stats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                    __shfl_xor_sync(0xffffffffu, st.sum_y, o)};
        st = merge(st, other);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_stats[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < kThreads / 32 ? warp_stats[lane] : Stats{-INFINITY, 0.0f, 0.0f};
        for (int o = 16; o > 0; o >>= 1) {
            Stats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                        __shfl_xor_sync(0xffffffffu, st.sum_y, o)};
            st = merge(st, other);
        }
        if (lane == 0) result = st;
    }
    __syncthreads();
    return result;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_ce_rows_kernel(slothai_fused_ce_rows_args a, bool vec_ok)
{
    constexpr int kVec = 16 / sizeof(T);
    const int64_t r = blockIdx.x;
    const int64_t V = a.vocab;
    T *row = static_cast<T *>(a.logits) + r * a.ld;
    const int64_t t = a.target[r];
    const float cap = a.softcap;
    auto y_of = [cap](float z) { return cap > 0.0f ? cap * tanhf(z / cap) : z; };

    if (t == a.ignore_index || t < 0 || t >= V) {
        const float v = t == a.ignore_index ? 0.0f : NAN;
        if (threadIdx.x == 0) a.loss[r] = v;
        if (a.grad)
            for (int64_t j = threadIdx.x; j < V; j += kThreads) row[j] = from_f<T>(v);
        return;
    }

    Stats st{-INFINITY, 0.0f, 0.0f};
    if (vec_ok) {
        const Vec<T> *rv = reinterpret_cast<const Vec<T> *>(row);
        for (int64_t i = threadIdx.x; i < V / kVec; i += kThreads) {
            const Vec<T> x = rv[i];
#pragma unroll
            for (int k = 0; k < kVec; ++k) add(st, y_of(to_f(x.v[k])));
        }
    } else {
        for (int64_t j = threadIdx.x; j < V; j += kThreads) add(st, y_of(to_f(row[j])));
    }
    st = block_reduce(st);
    const float lse = st.m + logf(st.s);
    const float eps = a.label_smoothing;
    if (threadIdx.x == 0) {
        const float yt = y_of(to_f(row[t]));
        // Terms whose factor is 0 left out, as the C reference (a -inf logit: 0 * inf).
        float loss = (1.0f - eps) * (lse - yt);
        if (eps != 0.0f) loss += eps * (lse - st.sum_y / (float)V);
        if (a.z_loss != 0.0f) loss += a.z_loss * lse * lse;
        a.loss[r] = loss;
    }
    if (!a.grad) return;
    // Every thread has read row[t] (thread 0) or is past pass 1: the block
    // reduction's barrier orders those reads before the in-place writes below.
    __syncthreads();

    const float g = a.grad[r * a.grad_stride];
    const float c1 = (1.0f + 2.0f * a.z_loss * lse) * g;
    const float smooth = eps / (float)V * g;
    const float hit = (1.0f - eps) * g;
    auto grad_of = [&](float z, int64_t j) {
        const float y = y_of(z);
        float d = expf(y - lse) * c1 - smooth - (j == t ? hit : 0.0f);
        if (cap > 0.0f) d *= 1.0f - (y / cap) * (y / cap);
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

} // namespace

extern "C" slothai_status slothai_fused_ce_rows_cuda(const slothai_fused_ce_rows_args *a, void *stream)
{
    if (!a || a->vocab <= 0 || a->ld < a->vocab || a->rows < 0 || a->rows > 0x7fffffff) return SLOTHAI_EINVAL;
    if (a->rows == 0) return SLOTHAI_OK;
    const size_t esize = a->dtype == SLOTHAI_FLOAT32 ? 4 : 2;
    const int64_t per_vec = 16 / (int64_t)esize;
    const bool vec_ok = a->vocab % per_vec == 0 && a->ld % per_vec == 0 &&
                        reinterpret_cast<uintptr_t>(a->logits) % 16 == 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const unsigned grid = (unsigned)a->rows;
    switch (a->dtype) {
    case SLOTHAI_FLOAT32: fused_ce_rows_kernel<float><<<grid, kThreads, 0, s>>>(*a, vec_ok); break;
    case SLOTHAI_FLOAT16: fused_ce_rows_kernel<__half><<<grid, kThreads, 0, s>>>(*a, vec_ok); break;
    case SLOTHAI_BFLOAT16: fused_ce_rows_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(*a, vec_ok); break;
    default: return SLOTHAI_EINVAL;
    }
    return cudaGetLastError() == cudaSuccess ? SLOTHAI_OK : SLOTHAI_ECUDA;
}
