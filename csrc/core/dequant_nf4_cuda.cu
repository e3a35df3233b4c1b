/*
 * NF4 dequantization on CUDA: both levels of scales and the 4-bit expansion in
 * ONE launch, no intermediate buffer.
 *
 *   s[b] = (code2[absmax_u8[b]] * absmax2[b / blocksize2]) + offset   (or absmax_f32[b])
 *   w[j] = NF4[nibble(j)] * s[j / blocksize]  -> out_dtype, round to nearest-even
 *
 * Each fp32 step is rounded on its own (__fmul_rn / __fadd_rn: nvcc would
 * otherwise contract the scale into an FMA), so results are bit-identical to
 * bitsandbytes and to the C reference in dequant_nf4.c.
 *
 * Work split: a thread owns groups of 8 consecutive elements (4 packed bytes ->
 * 8 outputs: one 16-byte store for fp16/bf16, two for fp32). A block of 256
 * threads handles kUnroll groups per thread, strided by blockDim so that every
 * load and store instruction of a warp touches one contiguous span. blocksize
 * >= 32 keeps each group inside one scale block: one scale per group, whose
 * 1-byte code, 4-byte nested scale and 4-byte level come from L1/L2.
 *
 * Traffic per element: 0.5 byte read + sizeof(out) written + 1/blocksize of the
 * scale bytes. Memory-bound: the floor is those bytes over copy bandwidth.
 */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "slothai.h"

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kGroup = 8;

__constant__ float kNF4[16] = SLOTHAI_NF4_LEVELS;

// Stores of the output type T: store1 one element, store8 eight consecutive
// ones (16-byte aligned) from fp32 values, rounded to nearest-even.
template <typename T> struct Out;
template <> struct Out<float> {
    static __device__ __forceinline__ void store8(float *p, const float v[8]) {
        reinterpret_cast<float4 *>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4 *>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    static __device__ __forceinline__ void store1(float *p, float v) { *p = v; }
};
// fp16 and bf16 differ only in their conversions (Conv): `pair` rounds two values
// into one 32-bit pair, `one` a single value; store8 writes four pairs as one
// 16-byte store.
template <typename T, typename Conv> struct Out16 {
    static __device__ __forceinline__ void store8(T *p, const float v[8]) {
        uint4 u;
        const auto h0 = Conv::pair(v[0], v[1]), h1 = Conv::pair(v[2], v[3]);
        const auto h2 = Conv::pair(v[4], v[5]), h3 = Conv::pair(v[6], v[7]);
        memcpy(&u.x, &h0, 4);
        memcpy(&u.y, &h1, 4);
        memcpy(&u.z, &h2, 4);
        memcpy(&u.w, &h3, 4);
        *reinterpret_cast<uint4 *>(p) = u;
    }
    static __device__ __forceinline__ void store1(T *p, float v) { *p = Conv::one(v); }
};
struct HalfConv {
    static __device__ __forceinline__ __half2 pair(float a, float b) { return __floats2half2_rn(a, b); }
    static __device__ __forceinline__ __half one(float v) { return __float2half_rn(v); }
};
struct Bf16Conv {
    static __device__ __forceinline__ __nv_bfloat162 pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
    static __device__ __forceinline__ __nv_bfloat16 one(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Out<__half> : Out16<__half, HalfConv> {};
template <> struct Out<__nv_bfloat16> : Out16<__nv_bfloat16, Bf16Conv> {};

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequant_nf4_kernel(slothai_nf4_args a, int log2_bs, int log2_bs2, int64_t full_groups, bool vec_ok)
{
    __shared__ float nf4[16];
    if (threadIdx.x < 16) nf4[threadIdx.x] = kNF4[threadIdx.x];
    __syncthreads();

    const bool nested = a.absmax_u8 != nullptr;
    const float offset = nested ? __ldg(a.offset) : 0.0f;
    const int64_t n = a.numel;
    const int64_t ngroups = (n + kGroup - 1) / kGroup;
    const int64_t first = (int64_t)blockIdx.x * (kThreads * kUnroll) + threadIdx.x;
    T *out = static_cast<T *>(a.out);

    // Issue every load of this thread's groups before the first use.
    uint32_t codes[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
        const int64_t g = first + (int64_t)k * kThreads;
        codes[k] = (vec_ok && g < full_groups) ? __ldg(reinterpret_cast<const uint32_t *>(a.packed) + g) : 0u;
    }

#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
        const int64_t g = first + (int64_t)k * kThreads;
        if (g >= ngroups) break;
        const int64_t j0 = g * kGroup;
        const int64_t b = j0 >> log2_bs;
        float s;
        if (nested) {
            s = __fmul_rn(__ldg(a.code2 + __ldg(a.absmax_u8 + b)), __ldg(a.absmax2 + (b >> log2_bs2)));
            s = __fadd_rn(s, offset);
        } else {
            s = __ldg(a.absmax_f32 + b);
        }
        if (vec_ok && g < full_groups) {
            // Little-endian: byte i of the word holds elements 2i (high) and 2i+1 (low).
            const uint32_t c = codes[k];
            float v[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                v[2 * i] = __fmul_rn(nf4[(c >> (8 * i + 4)) & 0xf], s);
                v[2 * i + 1] = __fmul_rn(nf4[(c >> (8 * i)) & 0xf], s);
            }
            Out<T>::store8(out + j0, v);
        } else {
            // The partial last group, or packed bytes that are not 4-byte aligned.
            const int64_t j1 = j0 + kGroup < n ? j0 + kGroup : n;
            for (int64_t j = j0; j < j1; ++j) {
                const uint8_t byte = __ldg(a.packed + (j >> 1));
                Out<T>::store1(out + j, __fmul_rn(nf4[(j & 1) ? (byte & 0xf) : (byte >> 4)], s));
            }
        }
    }
}

int log2_exact(int64_t v)
{
    int l = 0;
    while ((int64_t(1) << l) < v) ++l;
    return (int64_t(1) << l) == v ? l : -1;
}

} // namespace

extern "C" slothai_status slothai_dequant_nf4_cuda(const slothai_nf4_args *a, void *stream)
{
    if (!a || a->numel < 0) return SLOTHAI_EINVAL;
    if (a->numel == 0) return SLOTHAI_OK; // (empty tensors may have null data pointers)
    if ((a->absmax_u8 == nullptr) == (a->absmax_f32 == nullptr)) return SLOTHAI_EINVAL;
    const int log2_bs = log2_exact(a->blocksize);
    const int log2_bs2 = a->absmax_u8 ? log2_exact(a->blocksize2) : 0;
    if (log2_bs < 3 || log2_bs2 < 0) return SLOTHAI_EINVAL;

    const int64_t ngroups = (a->numel + kGroup - 1) / kGroup;
    const int64_t full_groups = a->numel / kGroup;
    const bool vec_ok = (reinterpret_cast<uintptr_t>(a->packed) % 4 == 0) &&
                        (reinterpret_cast<uintptr_t>(a->out) % 16 == 0);
    const int64_t blocks = (ngroups + kThreads * kUnroll - 1) / (kThreads * kUnroll);
    if (blocks > 0x7fffffff) return SLOTHAI_EINVAL;
    cudaStream_t s = static_cast<cudaStream_t>(stream);

    switch (a->out_dtype) {
    case SLOTHAI_FLOAT32:
        dequant_nf4_kernel<float><<<(unsigned)blocks, kThreads, 0, s>>>(*a, log2_bs, log2_bs2, full_groups, vec_ok);
        break;
    case SLOTHAI_FLOAT16:
        dequant_nf4_kernel<__half><<<(unsigned)blocks, kThreads, 0, s>>>(*a, log2_bs, log2_bs2, full_groups, vec_ok);
        break;
    case SLOTHAI_BFLOAT16:
        dequant_nf4_kernel<__nv_bfloat16><<<(unsigned)blocks, kThreads, 0, s>>>(*a, log2_bs, log2_bs2, full_groups, vec_ok);
        break;
    default:
        return SLOTHAI_EINVAL;
    }
    return cudaGetLastError() == cudaSuccess ? SLOTHAI_OK : SLOTHAI_ECUDA;
}
