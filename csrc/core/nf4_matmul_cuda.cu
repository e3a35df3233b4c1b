/*
 * x @ W^T with an NF4 weight read 4-bit, on CUDA: the decode-shape product.
 *
 *   out[i, j] = T( sum_b s[j, b] * sum_{c in unit b} T(NF4[code(j, c)]) x[i, c]
 *                  (+ lora_scale * lora_x[i] . lora_b[j]) (+ bias[j]) )
 *
 * (slothai.h gives the exact contract). For a few rows of x the product is
 * bound by the weight's bytes: ~0.52 a weight with double quantization, against
 * ~4.5 for dequantize-to-bf16 + GEMM (write 2, read 2 back). So the codes are
 * read once, straight into tensor-core fragments, and nothing of W is written.
 *
 * Tensor-core kernel (fp16 / bf16, sm_80+, K a multiple of 64, blocksize >= 64):
 *   mma.m16n8k16 with W as the 16-row A operand and x^T as the 8-column B
 *   operand ("swap AB": the output features fill the tile's 16 rows, the few
 *   tokens its 8 columns; MT tiles of 8 tokens share each A fragment).
 *   - A CTA owns 16 output features and up to 8 MT tokens; its warps (8) split
 *     K into units of 64 (one scale per feature and unit, as blocksize >= 64),
 *     interleaved so that the CTA's loads sweep 16 rows front to back. A warp
 *     issues the loads of a batch of P units (codes, scales, and x for one
 *     tile of tokens) before it uses the first; the batches are branch-free.
 *   - In a unit, lane (g, t) = (lane / 4, lane % 4) loads 8 bytes (16 codes)
 *     of rows g and g + 8 and the matching 16 x values of token g. The k index
 *     inside a unit is permuted (A and B alike, so the sum is unchanged): byte
 *     8t + 2s + h of the row is step s's k pair (2t, 2t + 1) for h = 0 and
 *     (2t + 8, 2t + 9) for h = 1 -- one byte is exactly one A register, and
 *     the lane's x values are 16 consecutive elements.
 *   - A byte becomes its register of two T(levels) with one shared-memory
 *     lookup in a 256-entry pair table, replicated per lane (32 KB) so that a
 *     warp's 32 lookups never share a bank. The unit's fp32 partial product is
 *     then scaled by the feature's block scale (both levels of double
 *     quantization recovered per unit, bitsandbytes' order of operations).
 *   - The 8 warps' partial sums meet in shared memory (the table's space);
 *     the LoRA term, the bias and one rounding come at the write.
 *   Traffic: the codes and scales once per 64 tokens, x from L1/L2, out once.
 *
 * Generic kernel (fp32, any K or blocksize, cards before sm_80): a warp per
 * output feature and 8 tokens, lanes striding K, scalar fp32 FMAs. Correct
 * everywhere; not tuned.
 */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "slothai.h"
#include "half_cuda.cuh"

namespace {

using slothai_cuda::from_f;
using slothai_cuda::to_f;

constexpr int kWarps = 8; // generic kernel: a warp per output feature
constexpr int kThreads = kWarps * 32;
constexpr int kUnit = 64;     // k per unit: one block scale per (feature, unit)

__constant__ float kNF4[16] = SLOTHAI_NF4_LEVELS;

// The block scale s[b] of slothai_nf4_args, each fp32 step rounded on its own.
// `offset` is read on the device by each CTA (at()), never on the host.
struct Scales {
    const uint8_t *u8;
    const float *f32, *code2, *absmax2, *offset_ptr;
    float offset;
    int log2_bs2;

    __device__ __forceinline__ Scales at() const {
        Scales s = *this;
        s.offset = u8 ? __ldg(offset_ptr) : 0.0f;
        return s;
    }

    __device__ __forceinline__ float operator()(int64_t b, const float *code2_smem) const {
        if (!u8) return __ldg(f32 + b);
        return __fadd_rn(__fmul_rn(code2_smem[__ldg(u8 + b)], __ldg(absmax2 + (b >> log2_bs2))), offset);
    }
};

template <typename T> struct Tc;
template <> struct Tc<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pair(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
        __trap(); // never launched: the host checks the code's architecture first
#endif
    }
};
template <> struct Tc<__half> {
    static __device__ __forceinline__ uint32_t pair(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
        __trap();
#endif
    }
};

// The low-rank term's share of lane qi of 4: sum over q = 8 qi .. 8 qi + 7 (mod 32) of
// lora_x[i, q] lora_b[j, q], fp32 (its 16 loads at rank 32 issued together: one trip
// to memory for the quad's output, not one a step of q).
template <typename L>
__device__ __forceinline__ float lora_share(const slothai_nf4_matmul_args &a, int64_t i, int64_t j, int qi)
{
    const L *lx = static_cast<const L *>(a.lora_x) + i * a.r, *lb = static_cast<const L *>(a.lora_b) + j * a.r;
    float low = 0.0f;
    for (int64_t q0 = 8 * qi; q0 < a.r; q0 += 32)
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (q0 + e < a.r) low = fmaf(to_f(lx[q0 + e]), to_f(lb[q0 + e]), low);
    return low;
}

// The write of one output: the fp32 sum, the low-rank term (`low`: lora_x[i] . lora_b[j]) and the
// bias, rounded once.
template <typename T>
__device__ __forceinline__ void finish(const slothai_nf4_matmul_args &a, int64_t i, int64_t j, float acc, float low)
{
    if (a.lora_x) acc = fmaf(a.lora_scale, low, acc);
    if (a.bias) acc += to_f(static_cast<const T *>(a.bias)[j]);
    static_cast<T *>(a.out)[i * a.n + j] = from_f<T>(acc);
}

// One output written by one thread (the generic kernel): its low-rank term in q order.
template <typename T>
__device__ __forceinline__ void finish(const slothai_nf4_matmul_args &a, int64_t i, int64_t j, float acc)
{
    float l[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (a.lora_x)
        for (int qi = 0; qi < 4; ++qi)
            l[qi] = a.lora_dtype == SLOTHAI_FLOAT32 ? lora_share<float>(a, i, j, qi) : lora_share<T>(a, i, j, qi);
    finish<T>(a, i, j, acc, (l[0] + l[1]) + (l[2] + l[3])); // the quads' order (meet_and_write)
}

// The end of a 16-feature tile: the WARPS warps' mma accumulators (rows g, g + 8; tokens
// 2t, 2t + 1 of each tile of 8) meet in red[warp][feature][token], summed in warp order,
// and each output is written as finish() says (LOW: the low-rank term is already in the
// sums, low_into, and a thread writes an output with its bias). Its first barrier also waits
// out whoever still reads `red` (the table, or the last tile's sums).
template <typename T, int MT, int WARPS, bool LOW = false>
__device__ __forceinline__ void meet_and_write(const slothai_nf4_matmul_args &a, float *red,
                                               const float (&acc)[MT][4], int64_t n0, int64_t m0)
{
    constexpr int kTok = 8 * MT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float *r = red + (warp * 16 + g) * kTok + mt * 8 + 2 * t;
        r[0] = acc[mt][0];
        r[1] = acc[mt][1];
        r[8 * kTok] = acc[mt][2];
        r[8 * kTok + 1] = acc[mt][3];
    }
    __syncthreads();
    if constexpr (LOW) { // (the low-rank term is in the sums: a thread an output, tokens fastest)
        for (int idx = threadIdx.x; idx < 16 * kTok; idx += WARPS * 32) {
            const int row = idx / kTok, tok = idx % kTok;
            const int64_t j = n0 + row, i = m0 + tok;
            if (i >= a.m || j >= a.n) continue;
            float sum = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) sum += red[(w * 16 + row) * kTok + tok];
            if (a.bias) sum += to_f(static_cast<const T *>(a.bias)[j]);
            static_cast<T *>(a.out)[i * a.n + j] = from_f<T>(sum);
        }
        return;
    }
    // A quad an output: its 4 lanes share the low-rank term (lora_share), lane 0 sums the warps
    // and writes. Rounds over the tile's live tokens only (the same count in every thread).
    const int64_t live_tok = a.m - m0 < kTok ? a.m - m0 : kTok;
    const int qi = threadIdx.x & 3;
    for (int base = 0; base < 16 * live_tok; base += WARPS * 8) {
        const int idx = base + (threadIdx.x >> 2), row = idx & 15, tok = idx >> 4;
        const int64_t j = n0 + row, i = m0 + tok;
        const bool live = idx < 16 * live_tok && j < a.n;
        float low = 0.0f;
        if (live && a.lora_x)
            low = a.lora_dtype == SLOTHAI_FLOAT32 ? lora_share<float>(a, i, j, qi) : lora_share<T>(a, i, j, qi);
        low += __shfl_xor_sync(0xffffffffu, low, 1);
        low += __shfl_xor_sync(0xffffffffu, low, 2);
        if (!live || qi) continue;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += red[(w * 16 + row) * kTok + tok];
        finish<T>(a, i, j, sum, low);
    }
}

// x values of one unit for token m: 16 consecutive elements at column c0, as 8 pairs.
template <typename T>
__device__ __forceinline__ void load_x(uint32_t (&v)[8], const T *x, int64_t m, int64_t M, int64_t K, int64_t c0)
{
    uint4 a = make_uint4(0, 0, 0, 0), b = a;
    if (m < M) {
        const uint4 *p = reinterpret_cast<const uint4 *>(x + m * K + c0);
        a = __ldg(p);
        b = __ldg(p + 1);
    }
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// WARPS warps split K; each loads P units ahead (and, with PIPE, the next P
// while it computes); x is loaded with its unit's codes when one tile of tokens
// (MT == 1, decode) keeps that in registers.
template <typename T, int MT, int WARPS, int P, bool PIPE>
__global__ void __launch_bounds__(WARPS * 32)
nf4_matmul_tc_kernel(slothai_nf4_matmul_args a, Scales scales, int log2_bs, int64_t m_base)
{
    constexpr bool kXAhead = MT == 1;
    __shared__ uint32_t table[256 * 32]; // [byte][lane]: T(NF4[hi nibble]) | T(NF4[lo nibble]) << 16
    __shared__ float code2[256];
    const Scales sc = scales.at();
    for (int i = threadIdx.x; i < 256 * 32; i += WARPS * 32) table[i] = Tc<T>::pair(kNF4[i >> 9], kNF4[(i >> 5) & 15]);
    if (sc.u8)
        for (int i = threadIdx.x; i < 256; i += WARPS * 32) code2[i] = __ldg(sc.code2 + i);
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t N = a.n, K = a.k, M = a.m;
    const int64_t n0 = (int64_t)blockIdx.x * 16, m0 = m_base + (int64_t)blockIdx.y * (8 * MT);
    // Rows past N read row N - 1 (valid memory); their sums are never written.
    const int64_t ra = n0 + g < N ? n0 + g : N - 1, rb = n0 + g + 8 < N ? n0 + g + 8 : N - 1;
    const uint8_t *pa = a.w.packed + ra * (K / 2) + 8 * t, *pb = a.w.packed + rb * (K / 2) + 8 * t;
    const int64_t units = K / kUnit;
    const char *lut = reinterpret_cast<const char *>(table) + 4 * lane;
    const T *x = static_cast<const T *>(a.x);

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;

    // A batch: P units of one warp, strided by WARPS. Loads are branch-free (a
    // unit past the end reloads the last one, whose sum is then not added) so
    // that every load of a batch is issued before the first use; with PIPE the
    // next batch's loads are in flight while this one computes.
    struct Batch {
        uint2 wa[P], wb[P];
        float sa[P], sb[P];
        uint32_t xv[kXAhead ? P : 1][8];
    };
    auto load = [&](Batch &b, int64_t u0) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const int64_t u = u0 + p * WARPS < units ? u0 + p * WARPS : units - 1;
            b.wa[p] = __ldg(reinterpret_cast<const uint2 *>(pa + u * (kUnit / 2)));
            b.wb[p] = __ldg(reinterpret_cast<const uint2 *>(pb + u * (kUnit / 2)));
            b.sa[p] = sc((ra * K + u * kUnit) >> log2_bs, code2);
            b.sb[p] = sc((rb * K + u * kUnit) >> log2_bs, code2);
            if constexpr (kXAhead) load_x(b.xv[p], x, m0 + g, M, K, u * kUnit + 16 * t);
        }
    };
    auto compute = [&](const Batch &b, int64_t u0) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const bool real = u0 + p * WARPS < units;
            const int64_t u = real ? u0 + p * WARPS : units - 1;
            // A fragments of the unit's 4 steps: one table lookup per code byte.
            uint32_t frag[4][4];
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const uint32_t wA = s < 2 ? b.wa[p].x : b.wa[p].y, wB = s < 2 ? b.wb[p].x : b.wb[p].y;
                const int sh = 16 * (s & 1);
                frag[s][0] = *reinterpret_cast<const uint32_t *>(lut + (((wA >> sh) & 0xff) << 7));
                frag[s][1] = *reinterpret_cast<const uint32_t *>(lut + (((wB >> sh) & 0xff) << 7));
                frag[s][2] = *reinterpret_cast<const uint32_t *>(lut + (((wA >> (sh + 8)) & 0xff) << 7));
                frag[s][3] = *reinterpret_cast<const uint32_t *>(lut + (((wB >> (sh + 8)) & 0xff) << 7));
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t own[8];
                const uint32_t *xs = own;
                if constexpr (kXAhead) xs = b.xv[p];
                else load_x(own, x, m0 + mt * 8 + g, M, K, u * kUnit + 16 * t);
                float blk[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                Tc<T>::mma(blk, frag[0], xs[0], xs[1]);
                Tc<T>::mma(blk, frag[1], xs[2], xs[3]);
                Tc<T>::mma(blk, frag[2], xs[4], xs[5]);
                Tc<T>::mma(blk, frag[3], xs[6], xs[7]);
                acc[mt][0] = real ? fmaf(b.sa[p], blk[0], acc[mt][0]) : acc[mt][0];
                acc[mt][1] = real ? fmaf(b.sa[p], blk[1], acc[mt][1]) : acc[mt][1];
                acc[mt][2] = real ? fmaf(b.sb[p], blk[2], acc[mt][2]) : acc[mt][2];
                acc[mt][3] = real ? fmaf(b.sb[p], blk[3], acc[mt][3]) : acc[mt][3];
            }
        }
    };
    constexpr int64_t kStep = WARPS * P;
    if constexpr (!PIPE) {
        for (int64_t u0 = warp; u0 < units; u0 += kStep) {
            Batch b;
            load(b, u0);
            compute(b, u0);
        }
    } else {
        Batch b0, b1;
        int64_t u0 = warp;
        if (u0 < units) load(b0, u0);
        for (; u0 < units; u0 += 2 * kStep) {
            if (u0 + kStep < units) load(b1, u0 + kStep);
            compute(b0, u0);
            if (u0 + kStep >= units) break;
            if (u0 + 2 * kStep < units) load(b0, u0 + 2 * kStep);
            compute(b1, u0 + kStep);
        }
    }

    // The warps' partial sums meet in the table's space.
    static_assert(WARPS * 16 * 8 * MT * 4 <= sizeof(table), "reduction space");
    meet_and_write<T, MT, WARPS>(a, reinterpret_cast<float *>(table), acc, n0, m0);
}

// The products one decode launch computes: S of them sharing x (m, k, dtype and x equal;
// slothai_nf4_matmul_group_cuda), their 16-feature tiles numbered one product after another.
template <int S> struct Segments {
    slothai_nf4_matmul_args a[S];
    Scales sc[S];
    int log2_bs[S];
    int64_t tiles_before[S + 1]; // [s]: the tiles of products 0..s-1; [S]: all

    // The product tile `tile` belongs to.
    __device__ __forceinline__ int product(int64_t tile) const
    {
        int p = 0;
#pragma unroll
        for (int i = 1; i < S; ++i) p += tile >= tiles_before[i];
        return p;
    }
};

// What the decode kernels (nf4_decode_kernel, nf4_stream_kernel) share.

// The pair table, [byte][lane]: T(NF4[hi nibble]) | T(NF4[lo nibble]) << 16, 16 bytes a store
// (a quarter-warp fills one byte's 32-lane row, conflict-free); each product's code2. THREADS: the CTA's.
template <typename T, int THREADS> __device__ __forceinline__ void build_pairs(uint32_t *table)
{
    for (int i = threadIdx.x; i < 256 * 8; i += THREADS) {
        const uint32_t v = Tc<T>::pair(kNF4[i >> 7], kNF4[(i >> 3) & 15]);
        reinterpret_cast<uint4 *>(table)[i] = make_uint4(v, v, v, v);
    }
}
template <int S, int THREADS> __device__ __forceinline__ void load_code2(float (*code2)[256], const Segments<S> &seg)
{
#pragma unroll
    for (int s = 0; s < S; ++s)
        if (seg.sc[s].u8)
            for (int i = threadIdx.x; i < 256; i += THREADS) code2[s][i] = __ldg(seg.sc[s].code2 + i);
}
template <typename T, int S, int THREADS>
__device__ __forceinline__ void build_tables(uint32_t *table, float (*code2)[256], const Segments<S> &seg)
{
    build_pairs<T, THREADS>(table);
    load_code2<S, THREADS>(code2, seg);
}

// A code byte's register of two T(levels): the table row of byte b is at base + 128 b (a
// 32-bit shared address: one byte permute, one multiply-add, one shared load).
struct Lut {
    uint32_t base;
    __device__ explicit Lut(const uint32_t *table)
        : base(static_cast<uint32_t>(__cvta_generic_to_shared(table)) + 4 * (threadIdx.x & 31)) {}
    __device__ __forceinline__ uint32_t operator()(uint32_t w, int byte) const
    {
        uint32_t v;
        asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(base + (__byte_perm(w, 0, 0x4440 | byte) << 7)));
        return v;
    }
};

// x of this lane's token in each of MT tiles of 8 (lane (g, t): token g, 16 values a unit
// from 16 t, 8 uint4 a unit apart); zeros past M.
template <typename T, int MT> struct XRows {
    bool has[MT];
    const uint4 *row[MT];
    __device__ XRows(const void *x, int64_t m0, int64_t M, int64_t K, int g, int t)
    {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            has[mt] = m0 + 8 * mt + g < M;
            row[mt] = reinterpret_cast<const uint4 *>(static_cast<const T *>(x) + (has[mt] ? m0 + 8 * mt + g : 0) * K + 16 * t);
        }
    }
    __device__ __forceinline__ void load(int mt, int64_t u, uint32_t (&xs)[8]) const
    {
        uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0;
        if (has[mt]) x0 = __ldg(row[mt] + 8 * u), x1 = __ldg(row[mt] + 8 * u + 1);
        xs[0] = x0.x, xs[1] = x0.y, xs[2] = x0.z, xs[3] = x0.w, xs[4] = x1.x, xs[5] = x1.y, xs[6] = x1.z, xs[7] = x1.w;
    }
};

// One unit (64 k) of rows g and g + 8 from their code bytes wa, wb: the A fragments of its 4
// steps of k16, the products with each token tile's x (given for one tile, loaded here for
// more), scaled into acc by the rows' block scales.
template <typename T, int MT>
__device__ __forceinline__ void unit_product(const Lut &look, const XRows<T, MT> &x, int64_t u, uint2 wa, uint2 wb,
                                             const uint32_t (&x_ahead)[8], float sa, float sb, float (&acc)[MT][4])
{
    uint32_t frag[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const uint32_t wA = s < 2 ? wa.x : wa.y, wB = s < 2 ? wb.x : wb.y;
        const int byte = 2 * (s & 1);
        frag[s][0] = look(wA, byte), frag[s][1] = look(wB, byte);
        frag[s][2] = look(wA, byte + 1), frag[s][3] = look(wB, byte + 1);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        uint32_t own[8];
        const uint32_t *xs = x_ahead;
        if (MT > 1) x.load(mt, u, own), xs = own;
        float blk[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int s = 0; s < 4; ++s) Tc<T>::mma(blk, frag[s], xs[2 * s], xs[2 * s + 1]);
        acc[mt][0] = fmaf(sa, blk[0], acc[mt][0]);
        acc[mt][1] = fmaf(sa, blk[1], acc[mt][1]);
        acc[mt][2] = fmaf(sb, blk[2], acc[mt][2]);
        acc[mt][3] = fmaf(sb, blk[3], acc[mt][3]);
    }
}

// Decode kernel (up to 16 rows: MT tiles of 8 tokens sharing each A fragment; the
// default for 1..16 rows). The tensor-core kernel's unit, fragments and 16-feature
// tiles, with half the instructions a unit (86 SASS instructions against 167 at one
// tile, sm_90), as at one token that loop is bound by instruction issue, not memory
// latency (H100: 1.15 TB/s against 0.86 at an 8B layer):
//   - persistent CTAs (as many as fit; each loops over tiles), so the 32 KB table is
//     built once per CTA, not once per 16 features;
//   - a warp takes 4 consecutive units a batch: its code and x loads are immediate
//     offsets of one pointer, and lane (g, t) works out the block scales of unit t
//     for rows g and g + 8 only, which its quad then shares by shuffle;
//   - a code byte's table address is one byte permute and one multiply-add;
//   - full batches carry no bounds checks; a warp's last, partial batch goes a unit
//     at a time.
//   - S products sharing x (a layer's q/k/v, or gate/up) run as one launch: their tiles
//     are numbered one product after another, and a tile's product is found by comparing
//     its number with S - 1 boundaries (each product's pointers, scales and sizes read from
//     the kernel's parameters, a __grid_constant__ struct: not copied per thread).
// Split: K over the CTA's warps (4 units apart, then WARPS x 4), features (of every
// product) over CTAs.
// Traffic: the codes and scales once (0.52 bytes a weight), x from L1/L2, out once;
// floor at one row: an 8B layer's 112.5 MB at the card's read bandwidth.
template <typename T, int MT, int WARPS, int MIN_CTAS, int S>
__global__ void __launch_bounds__(WARPS * 32, MIN_CTAS)
nf4_decode_kernel(const __grid_constant__ Segments<S> seg, int64_t m_base)
{
    constexpr int P = 4, kTok = 8 * MT;
    __shared__ __align__(16) uint32_t table[256 * 32];
    __shared__ float code2[S][256];
    __shared__ float red[WARPS * 16 * kTok];
    const Scales sc0 = seg.sc[0].at();
    build_tables<T, S, WARPS * 32>(table, code2, seg);
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t K = seg.a[0].k, M = seg.a[0].m, tiles = seg.tiles_before[S], units = K / kUnit;
    const int64_t m0 = m_base + (int64_t)blockIdx.y * kTok;
    const Lut look(table);
    const XRows<T, MT> x(seg.a[0].x, m0, M, K, g, t);

    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int prod = seg.product(tile);
        const slothai_nf4_matmul_args &a = seg.a[prod];
        const Scales sc = S == 1 ? sc0 : seg.sc[prod].at();
        const float *c2 = code2[prod];
        const int unit_shift = seg.log2_bs[prod] - 6; // block of (row r, unit u) = (r * units + u) >> unit_shift
        const int64_t N = a.n, n0 = (tile - seg.tiles_before[prod]) * 16;
        const int64_t ra = n0 + g < N ? n0 + g : N - 1, rb = n0 + g + 8 < N ? n0 + g + 8 : N - 1;
        const uint8_t *pa = a.w.packed + ra * (K / 2) + 8 * t, *pb = a.w.packed + rb * (K / 2) + 8 * t;
        const int64_t qa = ra * units, qb = rb * units;
        float acc[MT][4] = {};
        auto load_unit = [&](int64_t u, uint2 &wa, uint2 &wb, uint32_t (&xs)[8]) {
            wa = __ldg(reinterpret_cast<const uint2 *>(pa + u * (kUnit / 2)));
            wb = __ldg(reinterpret_cast<const uint2 *>(pb + u * (kUnit / 2)));
            if (MT == 1) x.load(0, u, xs);
        };
        int64_t u0 = warp * P;
        for (; u0 + P <= units; u0 += WARPS * P) {
            uint2 wa[P], wb[P];
            uint32_t xs[P][8]; // (x of the one tile; unused for more)
#pragma unroll
            for (int p = 0; p < P; ++p) load_unit(u0 + p, wa[p], wb[p], xs[p]);
            const float my_sa = sc((qa + u0 + t) >> unit_shift, c2), my_sb = sc((qb + u0 + t) >> unit_shift, c2);
#pragma unroll
            for (int p = 0; p < P; ++p)
                unit_product<T, MT>(look, x, u0 + p, wa[p], wb[p], xs[p], __shfl_sync(0xffffffffu, my_sa, (lane & ~3) | p),
                                    __shfl_sync(0xffffffffu, my_sb, (lane & ~3) | p), acc);
        }
        for (int64_t u = u0; u < units && u < u0 + P; ++u) { // the warp's partial batch
            uint2 wa, wb;
            uint32_t xs[8];
            load_unit(u, wa, wb, xs);
            unit_product<T, MT>(look, x, u, wa, wb, xs, sc((qa + u) >> unit_shift, c2), sc((qb + u) >> unit_shift, c2), acc);
        }

        meet_and_write<T, MT, WARPS>(a, red, acc, n0, m0);
    }
}

// The low-rank term into the mma accumulators (rows g, g + 8; tokens 2t, 2t + 1 of each tile
// of 8), warp w summing q in its chunk of ceil(r / WARPS), scaled: the warps' sums then carry it.
template <typename L, int MT, int WARPS>
__device__ __forceinline__ void low_into(const slothai_nf4_matmul_args &a, float (&acc)[MT][4], int64_t n0, int64_t m0)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int r = (int)a.r, chunk = (r + WARPS - 1) / WARPS, q0 = warp * chunk, q1 = min(q0 + chunk, r);
    const L *lb = static_cast<const L *>(a.lora_b), *lx = static_cast<const L *>(a.lora_x);
    const L *ba = lb + min(n0 + g, a.n - 1) * r, *bb = lb + min(n0 + g + 8, a.n - 1) * r;
    float low[MT][4] = {};
#pragma unroll(MT == 1 ? 1 : 2) // (the unrolling that spills nothing on sm_90)
    for (int q = q0; q < q1; ++q) {
        const float wa = to_f(ba[q]), wb = to_f(bb[q]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int64_t i0 = m0 + 8 * mt + 2 * t;
            const float x0 = i0 < a.m ? to_f(lx[i0 * r + q]) : 0.0f, x1 = i0 + 1 < a.m ? to_f(lx[(i0 + 1) * r + q]) : 0.0f;
            low[mt][0] = fmaf(wa, x0, low[mt][0]), low[mt][1] = fmaf(wa, x1, low[mt][1]);
            low[mt][2] = fmaf(wb, x0, low[mt][2]), low[mt][3] = fmaf(wb, x1, low[mt][3]);
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][e] = fmaf(a.lora_scale, low[mt][e], acc[mt][e]);
}

// Streaming decode kernel: the decode kernel's units, fragments, tiles and split, with
// the codes and block scales brought to shared memory by cp.async (sm_80+) through a
// ring of STAGES batches per warp, so that a warp has STAGES - 1 batches (2 KB of codes
// each) in flight while it computes one, held in no register, and the first batches are
// in flight while the CTA builds its table. The ring runs across tiles: the reduction at
// a tile's end waits for nothing that is loading.
//   Batch (16 rows x 4 units) in its stage: codes [row r][128 B], row r's unit p at 32-byte
//   chunk p ^ (r & 3); then the scales: u8 [row][4] and the absmax2 of each row ([row], one
//   for the 4 units: blocksize2 >= 4 blocks), or fp32 [row][4]. A copy instruction takes 4
//   rows' 128-byte lines whole (lane: row lane / 8, 16 B c = lane % 8), each landing as one
//   row; the swizzle keeps a warp's 8-byte reads of a unit (rows g, 32 B each) conflict-free
//   per half-warp. Measured against the copy before it (codes [unit p][row r][32 B], as many
//   copy instructions, each 16 rows' 32-byte pieces; ncu in the bisect's copy of the kernel,
//   8B gate_proj: 917,504 against 688,128 shared-memory wavefronts of the code copies): the
//   8B layer grouped at one row 66.1 against 72.3 us, at 16 rows 119.2 against 124.3; the 1B
//   layer 28.3 against 29.6 and 51.7 against 52.6 (H100, 2026-12-06,
//   nf4_matmul_sweep_h100_copy.txt). The codes by the bulk tensor copy instead (sm_90, one lane a
//   warp issuing two 64 B x 16-row boxes, 64-byte swizzle, an mbarrier a stage) lost in the same
//   sweep: 69.1 and 126.5 us; 1D bulk copies (one 128 B row a lane) 80.4 in the bisect
//   (nf4_matmul_sweep_h100_bisect.txt); git history has both (a781b1d). On top of the row stage,
//   code2 by cp.async with the table built by shuffles, one barrier a tile and 32-bit offsets
//   (2251495) sped up only the 8B grouped layer at one row (63.4 against 66.1 us) and slowed the
//   rest (nf4_matmul_sweep_h100_lean.txt).
//   Takes blocksize 64, K a multiple of 256 (units in whole batches), the codes 16-byte,
//   the u8 scales and absmax2 4-byte, fp32 scales 16-byte aligned; else the decode kernel.
//   IDX32 (sm_90 only, where every product's codes are under 4 GB; the default there): the
//   copies' index arithmetic in 32 bits, a warp's batch loop 415 SASS instructions against 481.
//   PDL (sm_90 with IDX32, 1-8 rows by default): launched programmatic-dependent. Until
//   griddepcontrol.wait it only prefetches into L2 what its first batches will copy and builds
//   the pair table (the kernel before may still be running); then launch_dependents, the first
//   copies (from L2) and code2.
// Traffic and floor as the decode kernel's; shared memory per CTA: the table (32 KB),
// the warps' sums, code2, and WARPS x STAGES x 2304 B of ring.
constexpr int kStageBytes = 2048 + 256;

__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src)
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src)
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_commit()
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait()
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Programmatic dependent launch (the PDL form, sm_90): launched with the attribute, a kernel may
// start while the kernel before it on the stream is finishing. It reads nothing in global memory
// before grid_dependency_wait (which returns once that kernel has completed and its writes are
// visible) except through L2 prefetches, which are hints: L2 is where every write lands, so a
// line prefetched early is never stale. launch_dependents, called after the wait (so that a
// kernel after this one never starts before the one before it has completed), lets the next
// launch's CTAs start as this one's leave.
__device__ __forceinline__ void prefetch_l2(const void *p)
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}
__device__ __forceinline__ void grid_dependency_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// What the first batches of tile `tile` copy, prefetched into L2: its rows' first `units` units
// of codes (128-byte lines) and block scales, their absmax2, and the product's code2 and offset.
template <int S, int THREADS>
__device__ __forceinline__ void prefetch_first(const Segments<S> &seg, int64_t tile, int64_t units)
{
    if (tile >= seg.tiles_before[S]) return;
    const int prod = seg.product(tile);
    const slothai_nf4_matmul_args &a = seg.a[prod];
    const int64_t n0 = (tile - seg.tiles_before[prod]) * 16, rows = a.n - n0 < 16 ? a.n - n0 : 16, row = a.k / 2;
    units = units < a.k / kUnit ? units : a.k / kUnit;
    const int64_t lines = (units * (kUnit / 2) + 127) / 128;
    const unsigned char *codes = a.w.packed + n0 * row;
    for (int64_t e = threadIdx.x; e < rows * lines; e += THREADS) prefetch_l2(codes + (e / lines) * row + (e % lines) * 128);
    const int i = threadIdx.x % 32, w = threadIdx.x / 32; // warp 0 the scales, warp 1 code2 and offset
    if (w == 0 && i < rows) {
        const int64_t blk = (n0 + i) * (a.k / kUnit);
        if (a.w.absmax_u8) {
            prefetch_l2(a.w.absmax_u8 + blk), prefetch_l2(a.w.absmax_u8 + blk + units - 1);
            prefetch_l2(a.w.absmax2 + (blk >> seg.sc[prod].log2_bs2));
            prefetch_l2(a.w.absmax2 + ((blk + units - 1) >> seg.sc[prod].log2_bs2));
        } else {
            prefetch_l2(a.w.absmax_f32 + blk), prefetch_l2(a.w.absmax_f32 + blk + units - 1);
        }
    }
    if (w == 1 && a.w.absmax_u8 && i < 9) prefetch_l2(i < 8 ? static_cast<const void *>(a.w.code2 + 32 * i) : a.w.offset);
}

template <int MT, int WARPS, int S> __host__ __device__ constexpr int stream_smem(int stages)
{
    return 256 * 32 * 4 + WARPS * 16 * 8 * MT * 4 + S * 256 * 4 + WARPS * stages * kStageBytes;
}

template <typename T, int MT, int WARPS, int MIN_CTAS, int S, int STAGES, bool LOW = false, bool IDX32 = false,
          bool PDL = false>
__global__ void __launch_bounds__(WARPS * 32, MIN_CTAS)
nf4_stream_kernel(const __grid_constant__ Segments<S> seg, int64_t m_base)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
    if constexpr (IDX32) { // (built for sm_90 alone: the host launches it only there, idx32_takes)
        __trap();
        return;
    }
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap(); // never launched: the host checks the code's architecture first (no cp.async here)
#endif
    constexpr int P = 4, kTok = 8 * MT;
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t *table = reinterpret_cast<uint32_t *>(smem);
    float *red = reinterpret_cast<float *>(smem + 256 * 32 * 4);
    float(*code2)[256] = reinterpret_cast<float(*)[256]>(smem + 256 * 32 * 4 + WARPS * 16 * kTok * 4);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + stream_smem<MT, WARPS, S>(0) +
                          warp * STAGES * kStageBytes;
    const int64_t K = seg.a[0].k, M = seg.a[0].m, tiles = seg.tiles_before[S], units = K / kUnit, nb = units / P;
    const int64_t nbw = warp < nb ? (nb - 1 - warp) / WARPS + 1 : 0; // this warp's batches a tile
    const bool u8 = seg.a[0].w.absmax_u8 != nullptr;

    // The copy side: the next batch to load (tile it, batch ib of this warp) into stage is.
    int64_t it = blockIdx.x, ib = 0;
    int is = 0;
    // IDX32: the same copies in 32-bit index arithmetic (the host takes it where every product's codes
    // are under 4 GB: row offsets and block numbers then fit), the lane's part of each address once.
    const int c = lane & 7, last_tile = (int)tiles;
    const uint32_t lane_dst = (lane >> 3) * 128 + ((c >> 1) ^ (lane >> 3)) * 32 + 16 * (c & 1);
    const uint32_t half_k = (uint32_t)(K / 2), units32 = (uint32_t)units;
    int it32 = blockIdx.x, ib32 = 0;
    auto issue32 = [&] {
        if (nbw > 0 && it32 < last_tile) {
            int prod = 0;
#pragma unroll
            for (int i = 1; i < S; ++i) prod += it32 >= (int)seg.tiles_before[i];
            const slothai_nf4_matmul_args &a = seg.a[prod];
            const int last = (int)a.n - 1, n0 = (it32 - (int)seg.tiles_before[prod]) * 16, u0 = (warp + ib32 * WARPS) * P;
            const uint32_t dst = ring + is * kStageBytes, at = (uint32_t)u0 * (kUnit / 2) + 16 * c;
            const int r0 = n0 + (lane >> 3); // rows r0, r0 + 4, r0 + 8, r0 + 12 (past N: N - 1's, unused)
#pragma unroll
            for (int j = 0; j < 4; ++j)
                cp_async16(dst + lane_dst + 512 * j, a.w.packed + ((uint32_t)min(r0 + 4 * j, last) * half_k + at));
            const uint32_t blk = (uint32_t)min(n0 + (lane & 15), last) * units32 + (uint32_t)u0;
            if (u8) {
                if (lane < 16) cp_async4(dst + 2048 + 4 * lane, a.w.absmax_u8 + blk);
                else cp_async4(dst + 2048 + 64 + 4 * (lane - 16), a.w.absmax2 + (blk >> seg.sc[prod].log2_bs2));
            } else if (lane < 16) {
                cp_async16(dst + 2048 + 16 * lane, a.w.absmax_f32 + blk);
            }
            if (++ib32 == (int)nbw) ib32 = 0, it32 += gridDim.x;
            is = is + 1 == STAGES ? 0 : is + 1;
        }
        cp_async_commit();
    };
    auto issue = [&] {
        if constexpr (IDX32) {
            issue32();
            return;
        }
        if (nbw > 0 && it < tiles) {
            const int prod = seg.product(it);
            const slothai_nf4_matmul_args &a = seg.a[prod];
            const int64_t n0 = (it - seg.tiles_before[prod]) * 16, u0 = (warp + ib * WARPS) * P;
            const int64_t rs = n0 + (lane & 15) < a.n ? n0 + (lane & 15) : a.n - 1; // this lane's scale row
            const uint32_t dst = ring + is * kStageBytes; // (c = lane & 7: the lane's 16 B of a row's 4 units)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int rl = 4 * j + (lane >> 3);                  // the row in the tile
                const int64_t r = n0 + rl < a.n ? n0 + rl : a.n - 1; // (rows past N: N - 1's, unused)
                cp_async16(dst + rl * 128 + ((c >> 1) ^ (rl & 3)) * 32 + 16 * (c & 1),
                           a.w.packed + r * (K / 2) + u0 * (kUnit / 2) + 16 * c);
            }
            if (u8) {
                const int64_t blk = rs * units + u0;
                if (lane < 16) cp_async4(dst + 2048 + 4 * lane, a.w.absmax_u8 + blk);
                else cp_async4(dst + 2048 + 64 + 4 * (lane - 16), a.w.absmax2 + (blk >> seg.sc[prod].log2_bs2));
            } else if (lane < 16) {
                cp_async16(dst + 2048 + 16 * lane, a.w.absmax_f32 + rs * units + u0);
            }
            if (++ib == nbw) ib = 0, it += gridDim.x;
            is = is + 1 == STAGES ? 0 : is + 1;
        }
        cp_async_commit(); // (an empty group past the last batch: the waits count groups)
    };
    if constexpr (PDL) { // the first batches' bytes to L2 and the table while the kernel before ends
        prefetch_first<S, WARPS * 32>(seg, blockIdx.x, WARPS * P * (STAGES - 1));
        build_pairs<T, WARPS * 32>(table);
        grid_dependency_wait();
        launch_dependents();
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) issue();
        load_code2<S, WARPS * 32>(code2, seg);
    } else {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) issue();
        build_tables<T, S, WARPS * 32>(table, code2, seg);
    }
    __syncthreads();

    const int64_t m0 = m_base + (int64_t)blockIdx.y * kTok;
    const Lut look(table);
    const XRows<T, MT> x(seg.a[0].x, m0, M, K, g, t);

    int cs = 0; // the stage this warp computes next
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int prod = seg.product(tile);
        const slothai_nf4_matmul_args &a = seg.a[prod];
        const float offset = u8 ? __ldg(seg.sc[prod].offset_ptr) : 0.0f;
        const float *c2 = code2[prod];
        float acc[MT][4] = {};
        for (int64_t b = 0; b < nbw; ++b) {
            const int64_t u0 = (warp + b * WARPS) * P;
            uint32_t xc[MT == 1 ? P : 1][8]; // one tile of tokens: x of the batch, loaded (L2) while its codes land
            if constexpr (MT == 1)
#pragma unroll
                for (int p = 0; p < P; ++p) x.load(0, u0 + p, xc[p]);
            cp_async_wait<STAGES - 2>(); // this lane's copies of stage cs have landed
            __syncwarp();                // and every lane's; all reads of the stage refilled below are done
            issue();
            const uint32_t st = ring + cs * kStageBytes;
            cs = cs + 1 == STAGES ? 0 : cs + 1;
            // Block scales of unit t, rows g and g + 8 (the quad shares them by shuffle).
            float my_sa, my_sb;
            if (u8) {
                uint32_t qa, qb;
                float a2a, a2b;
                asm("ld.shared.u8 %0, [%1];" : "=r"(qa) : "r"(st + 2048 + 4 * g + t));
                asm("ld.shared.u8 %0, [%1];" : "=r"(qb) : "r"(st + 2048 + 4 * (g + 8) + t));
                asm("ld.shared.f32 %0, [%1];" : "=f"(a2a) : "r"(st + 2048 + 64 + 4 * g));
                asm("ld.shared.f32 %0, [%1];" : "=f"(a2b) : "r"(st + 2048 + 64 + 4 * (g + 8)));
                my_sa = __fadd_rn(__fmul_rn(c2[qa], a2a), offset);
                my_sb = __fadd_rn(__fmul_rn(c2[qb], a2b), offset);
            } else {
                asm("ld.shared.f32 %0, [%1];" : "=f"(my_sa) : "r"(st + 2048 + 16 * g + 4 * t));
                asm("ld.shared.f32 %0, [%1];" : "=f"(my_sb) : "r"(st + 2048 + 16 * (g + 8) + 4 * t));
            }
#pragma unroll
            for (int p = 0; p < P; ++p) {
                uint2 wa, wb;
                const uint32_t ca = st + g * 128 + (p ^ (g & 3)) * 32 + 8 * t; // row g; row g + 8 at + 1024
                asm("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(wa.x), "=r"(wa.y) : "r"(ca));
                asm("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(wb.x), "=r"(wb.y) : "r"(ca + 8 * 128));
                unit_product<T, MT>(look, x, u0 + p, wa, wb, xc[MT == 1 ? p : 0], __shfl_sync(0xffffffffu, my_sa, (lane & ~3) | p),
                                    __shfl_sync(0xffffffffu, my_sb, (lane & ~3) | p), acc);
            }
        }
        const int64_t n0 = (tile - seg.tiles_before[prod]) * 16;
        if (LOW && a.lora_x) { // each warp's share of q of the low-rank term, in its accumulators
            if (a.lora_dtype == SLOTHAI_FLOAT32) low_into<float, MT, WARPS>(a, acc, n0, m0);
            else low_into<T, MT, WARPS>(a, acc, n0, m0);
        }
        meet_and_write<T, MT, WARPS, LOW>(a, red, acc, n0, m0);
    }
    cp_async_wait<0>();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
nf4_matmul_generic_kernel(slothai_nf4_matmul_args a, Scales scales, int log2_bs, int64_t m_base)
{
    const Scales sc = scales.at();
    __shared__ float level[16];
    __shared__ float code2[256];
    if (threadIdx.x < 16) level[threadIdx.x] = to_f(from_f<T>(kNF4[threadIdx.x])); // T(level), as the contract says
    if (sc.u8)
        for (int i = threadIdx.x; i < 256; i += kThreads) code2[i] = __ldg(sc.code2 + i);
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int64_t j = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5), m0 = m_base + (int64_t)blockIdx.y * 8;
    if (j >= a.n) return;
    const T *x = static_cast<const T *>(a.x);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t c = lane; c < a.k; c += 32) {
        const int64_t e = j * a.k + c;
        const uint8_t byte = __ldg(a.w.packed + (e >> 1));
        const float w = level[(e & 1) ? (byte & 0xf) : (byte >> 4)] * sc(e >> log2_bs, code2);
#pragma unroll
        for (int q = 0; q < 8; ++q)
            if (m0 + q < a.m) acc[q] = fmaf(w, to_f(x[(m0 + q) * a.k + c]), acc[q]);
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        for (int o = 16; o > 0; o >>= 1) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], o);
        if (lane == q && m0 + q < a.m) finish<T>(a, m0 + q, j, acc[q]);
    }
}

int log2_exact(int64_t v)
{
    int l = 0;
    while ((int64_t(1) << l) < v) ++l;
    return (int64_t(1) << l) == v ? l : -1;
}

// Whether the tensor-core kernel can run here: a card of sm_80 or later, and
// code for it built for sm_80 or later (a build for sm_75 + PTX runs that PTX,
// whose kernel body is the trap above).
template <typename T> bool tensor_cores_here()
{
    static std::atomic<int> code_arch{-1};
    int arch = code_arch.load(std::memory_order_relaxed);
    if (arch < 0) {
        cudaFuncAttributes attr;
        if (cudaFuncGetAttributes(&attr, nf4_matmul_tc_kernel<T, 1, 8, 4, false>) != cudaSuccess) return false;
        code_arch.store(arch = attr.ptxVersion < attr.binaryVersion ? attr.ptxVersion : attr.binaryVersion);
    }
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
        return false;
    return arch >= 80 && major >= 8;
}

// The grid of a persistent kernel: as many CTAs as the card holds at once, or `tiles`
// where fewer. `held` caches the count per device (one array per kernel).
int64_t persistent_ctas(std::atomic<int> (&held)[8], const void *kernel, int threads, int64_t tiles, size_t smem = 0)
{
    int dev = 0, per_sm = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return tiles;
    int n = dev < 8 ? held[dev].load(std::memory_order_relaxed) : 0;
    if (n <= 0) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess ||
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || per_sm * sms <= 0)
            return tiles;
        n = per_sm * sms;
        if (dev < 8) held[dev].store(n, std::memory_order_relaxed);
    }
    return n < tiles ? n : tiles;
}

template <typename T, int MT, int WARPS, int P, bool PIPE = false>
void launch_tc(const slothai_nf4_matmul_args &a, const Scales &sc, int log2_bs, cudaStream_t s)
{
    const int64_t per = 8 * MT, groups = (a.m + per - 1) / per, max_y = 65535;
    for (int64_t y0 = 0; y0 < groups; y0 += max_y) {
        const dim3 grid((unsigned)((a.n + 15) / 16), (unsigned)(groups - y0 < max_y ? groups - y0 : max_y));
        nf4_matmul_tc_kernel<T, MT, WARPS, P, PIPE><<<grid, WARPS * 32, 0, s>>>(a, sc, log2_bs, y0 * per);
    }
}

template <typename T, int MT, int WARPS, int MIN_CTAS, int S>
void launch_decode_lean(const Segments<S> &seg, cudaStream_t s)
{
    const auto kernel = nf4_decode_kernel<T, MT, WARPS, MIN_CTAS, S>;
    const int64_t per = 8 * MT, groups = (seg.a[0].m + per - 1) / per, max_y = 65535;
    static std::atomic<int> held[8];
    const int64_t ctas = persistent_ctas(held, reinterpret_cast<const void *>(kernel), WARPS * 32, seg.tiles_before[S]);
    for (int64_t y0 = 0; y0 < groups; y0 += max_y) {
        const dim3 grid((unsigned)ctas, (unsigned)(groups - y0 < max_y ? groups - y0 : max_y));
        kernel<<<grid, WARPS * 32, 0, s>>>(seg, y0 * per);
    }
}

template <typename T, int MT, int WARPS, int MIN_CTAS, int S, int STAGES, bool LOW = false, bool IDX32 = false,
          bool PDL = false>
void launch_stream(const Segments<S> &seg, cudaStream_t s)
{
    const auto kernel = nf4_stream_kernel<T, MT, WARPS, MIN_CTAS, S, STAGES, LOW, IDX32, PDL>;
    constexpr int smem = stream_smem<MT, WARPS, S>(STAGES);
    static std::atomic<int> sized[8], held[8];
    int dev = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && dev < 8 && !sized[dev].load(std::memory_order_relaxed)) {
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        sized[dev].store(1, std::memory_order_relaxed);
    }
    const int64_t per = 8 * MT, groups = (seg.a[0].m + per - 1) / per, max_y = 65535;
    const int64_t ctas = persistent_ctas(held, reinterpret_cast<const void *>(kernel), WARPS * 32, seg.tiles_before[S], smem);
    for (int64_t y0 = 0; y0 < groups; y0 += max_y) {
        const dim3 grid((unsigned)ctas, (unsigned)(groups - y0 < max_y ? groups - y0 : max_y));
        if constexpr (PDL) {
            cudaLaunchAttribute attr;
            attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
            attr.val.programmaticStreamSerializationAllowed = 1;
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = grid, cfg.blockDim = dim3(WARPS * 32), cfg.dynamicSmemBytes = smem, cfg.stream = s;
            cfg.attrs = &attr, cfg.numAttrs = 1;
            cudaLaunchKernelEx(&cfg, kernel, seg, y0 * per); // (errors: cudaGetLastError, as <<< >>>)
        } else {
            kernel<<<grid, WARPS * 32, smem, s>>>(seg, y0 * per);
        }
    }
}

// Whether the IDX32 form's machine code on this device is sm_90's (elsewhere its body is a trap;
// asked once a device), and every product's codes are under 4 GB (its 32-bit row offsets and
// block numbers).
template <typename T, int S> bool idx32_takes(const Segments<S> &seg)
{
    for (int i = 0; i < S; ++i)
        if (seg.a[i].n * (seg.a[i].k / 2) >= (int64_t(1) << 32)) return false;
    static std::atomic<int> known[8]; // 0 not asked yet, 1 sm_90 code, 2 not
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev >= 8) return false;
    int k = known[dev].load(std::memory_order_relaxed);
    if (!k) {
        cudaFuncAttributes attr;
        k = cudaFuncGetAttributes(&attr, nf4_stream_kernel<T, 1, 8, 2, S, 3, false, true>) == cudaSuccess &&
                    attr.binaryVersion == 90
                ? 1
                : 2;
        known[dev].store(k, std::memory_order_relaxed);
    }
    return k == 1;
}

// Whether the streaming kernel takes every product of a launch (its comment says what it needs).
template <int S> bool stream_takes(const Segments<S> &seg)
{
    if (seg.a[0].k % (4 * kUnit)) return false;
    for (int i = 0; i < S; ++i) {
        const slothai_nf4_matmul_args &a = seg.a[i];
        if (a.w.blocksize != kUnit || reinterpret_cast<uintptr_t>(a.w.packed) % 16) return false;
        if (a.w.absmax_u8 ? reinterpret_cast<uintptr_t>(a.w.absmax_u8) % 4 || reinterpret_cast<uintptr_t>(a.w.absmax2) % 4 ||
                                seg.sc[i].log2_bs2 < 2
                          : reinterpret_cast<uintptr_t>(a.w.absmax_f32) % 16)
            return false;
        if ((a.w.absmax_u8 != nullptr) != (seg.a[0].w.absmax_u8 != nullptr)) return false;
    }
    return true;
}

// Tuning only (benchmarks/bench_nf4_matmul.py --sweep): SLOTHAI_NF4MM_CONFIG
// picks another kernel for up to 16 rows; unset, the default (0).
int tuning_config()
{
    static const int c = [] {
        const char *e = getenv("SLOTHAI_NF4MM_CONFIG");
        return e ? atoi(e) : 0;
    }();
    return c;
}

// Where the streaming kernel sums the low-rank term into its warps' accumulators (low_into) and
// writes a thread an output (LOW): 2-8 rows, and 9-16 rows with a low-rank term. The LOW form
// everywhere against the quad write with the term at the write (H100, 2026-12-06,
// nf4_matmul_sweep_h100_low.txt) lost at one row (8B grouped layer with fp32 LoRA r=32 75.6
// against 72.0 us) and at 16 rows without LoRA (123.9 against 119.0), so it takes the rest only.
// This rule against the quad write everywhere (tuning config 4; same card and date,
// nf4_matmul_sweep_h100_low_rule.txt), grouped layer: 8B with fp32 LoRA r=32 87.2 against 96.1 us
// at 8 rows, 137.0 against 147.8 at 16, without LoRA 74.0 against 80.2 at 8; 1B with LoRA 37.7
// against 42.1 and 60.2 against 71.0; one row unchanged. The decode step (bench_decode, one call):
// 8B batch 8 1625 against 1552 decode tokens/s, 1B 5053 against 4673.
// (Any product's term counts: a product without one is written bit for bit alike either way, so a
// grouped launch's outputs stay the single launches'.)
template <int S> bool low_in_sums(const Segments<S> &seg)
{
    bool low = false;
    for (int i = 0; i < S; ++i) low |= seg.a[i].lora_x != nullptr;
    return seg.a[0].m > 1 && (seg.a[0].m <= 8 || low);
}

// Up to 16 rows: the streaming kernel (3 stages) where it takes the launch (blocksize 64,
// in_features a multiple of 256: every Llama / Mistral / Qwen-7B projection), in its IDX32 form on
// sm_90 and there, at 1-8 rows, launched programmatic-dependent (PDL: the first batches' bytes
// prefetched into L2 and the table built while the kernel before ends); else the decode kernel. PDL
// against the same kernels launched plainly (config 6; H100, 2026-12-07,
// nf4_matmul_sweep_h100_pdl_l2.txt; kernel tests and memcheck clean): the 8B layer grouped at one
// row 58.8 against 65.4 us (1914 GB/s, 63% of the read-only kernel's 3030), at 8 rows 66.6 against
// 74.0, with fp32 LoRA r=32 64.2 against 71.1; each 8B projection alone 0.8-1.1 us faster, each 1B
// one 0.6-1.1 (the 1B layer grouped at 8 rows 30.8 against 30.1, slower); but at 16 rows (two token
// tiles, 3 CTAs an SM) slower, 127.0 against 117.9, so not there. The launch probe
// (nf4_launch_probe_h100.txt) puts the fixed cost a launch at 4.5-4.8 us with PDL against 5.4-6.7
// without. IDX32 against the 64-bit index arithmetic (config 5; H100, 2026-12-07,
// nf4_matmul_sweep_h100_idx32.txt; its kernel tests and memcheck clean): the 8B layer grouped at
// one row 65.2 against 66.3 us, at 16 rows 119.1 against 119.5, with fp32 LoRA r=32 at 16 rows
// 124.2 against 137.3; the 1B layer 27.6 against 28.3, 51.4 against 52.0, with LoRA at 16 rows 53.6
// against 59.0. One token tile (1-8 rows): 8 warps a CTA, 2 CTAs an SM; two tiles (9-16 rows): 4
// warps, 3 CTAs an SM. Measured (bench_nf4_matmul --sweep, H100), the 8B layer's seven projections
// grouped as the patch groups them: at one row 66.1 us (1701 GB/s), at 16 rows 119.2; the 1B layer
// 28.3 and 51.7 (2026-12-06, nf4_matmul_sweep_h100_copy.txt). The streaming kernel's first copy
// against the decode kernel (the wheel of 520b68b, nf4_matmul_sweep_h100_stream.txt): at one row
// 72.9 against 84.4 us, at 16 rows 124.7 against 136.6; the 1B layer 29.8 against 32.0 and 53.1
// against 57.2. Earlier (H200, 2026-12-05, nf4_matmul_sweep_h200.txt): the decode kernel at one row
// 91.9 us with 8 warps against 98.5 with 4, at 16 rows 148.1 with 4 against 187.4 with 8; the
// tensor-core kernel 129.0 at one row.
// Tuning (SLOTHAI_NF4MM_CONFIG): 1 the decode kernel with the two warp counts swapped, 2 the
// tensor-core kernel (both for single products only), 3 the decode kernel everywhere (the
// default before the streaming kernel), 4 the streaming kernel with its quad write everywhere
// (the default before low_in_sums), 5 the default with the copies' index arithmetic in 64 bits
// (the default before IDX32, and off sm_90), 6 the default launched plainly at 1-8 rows (the
// default before PDL; sm_90).
// Tried and taken out (H100, 2026-12-06 and -07; git history has the code):
// - WIDE, a table lookup in two instructions instead of three (a byte permute making the whole
//   shared address, the table's rows 256 bytes apart, the ring in their free halves; the batch
//   loop 408 SASS instructions against 462, 346 with IDX32): the 8B grouped layer at one row
//   66.7 against 66.4 us, at 16 rows 123.3 against 119.2; with IDX32 65.0 and 122.3
//   (2026-12-07, nf4_matmul_sweep_h100_wide.txt). An eighth fewer instructions bought nothing at
//   one row: the loop is not bound by instruction issue. The code: cacbf0c.
// - each tile's K split over a cluster of 2 or 4 CTAs, their sums met in CTA 0 through the
//   cluster's shared memory (for launches with fewer tiles than CTAs): slower everywhere, even
//   there; 8B k_proj alone at one row 5.7 and 8.4 against 5.0 us, the 8B grouped layer 101.3
//   and 171.7 against 66.4 (2026-12-07, nf4_matmul_sweep_h100_clusters.txt). The code: 94d10a6.
// - 4 stages instead of 3: 8B grouped layer 75.1 against 72.9 us at one row, 130.4 against
//   124.5 at 16 (nf4_matmul_sweep_h100_stages.txt).
// - the low-rank operands staged in shared memory as fp32 a tile at a time (one coalesced trip
//   a tile): 8B grouped layer with fp32 LoRA r=32 83.4 against 76.6 us at one row, barely
//   faster at 16 (152.1 against 154.0); the 1B layer 38.0 against 33.6 at one row
//   (nf4_matmul_sweep_h100_lora_stage.txt).
// - the low-rank operands (a tile's lora_b rows, its tokens' lora_x rows) copied into shared memory
//   by cp.async a tile ahead, two buffers, read from there at the tile's write (H200, 2026-12-06,
//   nf4_matmul_sweep_h200_lora_ahead.txt; tests, memcheck and racecheck clean): the grouped layer
//   with fp32 LoRA r=32 no faster at 8 and 16 rows (8B 97.2 against 96.9 us, 148.8 against
//   149.5) and slower at one row (75.9 against 70.4; 1B 35.6 against 31.0). With the staging at
//   the tile's end above, two ways of taking the trip to memory out of the write have not moved
//   the term's cost: what costs is not that trip (the write's rounds, which all warps wait on,
//   are the suspect; not measured apart). The code: a0ab63a.
// - programmatic dependent launch in a first form (griddepcontrol.wait after the pair table, no
//   prefetch, no early trigger; cudaLaunchKernelEx, inductor's triton.enable_pdl): the small 1B
//   projections 0.3-0.7 us faster in the sweep, the decode step no faster (1B batch 1 687 against
//   678 decode tokens/s, 8B 224 against 226; decode_llama-*_h100_pdl1.txt against
//   decode_llama-*_h100_attn2_sdpa.txt, one machine). Today's form (above) adds the L2 prefetch
//   and launch_dependents.
// - loading a warp's next batch of codes and scale bytes into registers before computing this
//   one (nf4_matmul_sweep_h100_pipe.txt: 8B layer at one row 96.4 against 96.7 us, 1B 44.2
//   against 40.0). The decode kernel sits at its register cap (128 a thread), so a second batch
//   held in registers likely bought no more bytes in flight (a hypothesis); the streaming kernel
//   holds its batches in shared memory instead, and gained.
// - x's 16 tokens copied into shared memory once a CTA at 9-16 rows (K up to 4096, one CTA of 8
//   warps an SM; sm_90 only), against x's fragments read from L2 per tile (H100, 2026-12-07,
//   nf4_matmul_sweep_h100_xs.txt; kernel tests, memcheck and racecheck clean): slower at 16 rows,
//   the 8B grouped layer 124.9 against 119.3 us, the 1B 59.3 against 52.1 (with fp32 LoRA r=32,
//   8B 138.6 against 140.2). So the re-reads of x from L2 are not what holds 16 rows. The code:
//   c59817c.
// The streaming kernel in the default's shapes (one token tile at 1-8 rows: 8 warps, 2 CTAs an SM;
// two at 9-16: 4 warps, 3 CTAs), with the LOW write or not, IDX32 or not, PDL (one tile only) or not.
template <typename T, int S, bool IDX32 = false, bool PDL = false>
void launch_stream_as_default(const Segments<S> &seg, bool low, cudaStream_t s)
{
    if (seg.a[0].m > 8) { // (not PDL: measured slower at two token tiles, see launch_decode)
        low ? launch_stream<T, 2, 4, 3, S, 3, true, IDX32>(seg, s) : launch_stream<T, 2, 4, 3, S, 3, false, IDX32>(seg, s);
    } else {
        low ? launch_stream<T, 1, 8, 2, S, 3, true, IDX32, PDL>(seg, s) : launch_stream<T, 1, 8, 2, S, 3, false, IDX32, PDL>(seg, s);
    }
}

template <typename T, int S> void launch_decode(const Segments<S> &seg, cudaStream_t s)
{
    const bool two = seg.a[0].m > 8;
    const int config = tuning_config();
    if (config == 0 && stream_takes(seg))
        return idx32_takes<T, S>(seg) ? launch_stream_as_default<T, S, true, true>(seg, low_in_sums(seg), s)
                                      : launch_stream_as_default<T, S>(seg, low_in_sums(seg), s);
    if (config == 6 && stream_takes(seg) && idx32_takes<T, S>(seg))
        return launch_stream_as_default<T, S, true>(seg, low_in_sums(seg), s);
    if ((config == 4 || config == 5) && stream_takes(seg))
        return launch_stream_as_default<T, S>(seg, config == 5 && low_in_sums(seg), s);
    switch (S == 1 ? config : 0) { // (the tuning configs 1, 2 for single products only: fewer kernels built)
    case 1:
        if constexpr (S == 1) two ? launch_decode_lean<T, 2, 8, 2, S>(seg, s) : launch_decode_lean<T, 1, 4, 4, S>(seg, s);
        break;
    case 2:
        for (int i = 0; i < S; ++i)
            two ? launch_tc<T, 2, 8, 4>(seg.a[i], seg.sc[i], seg.log2_bs[i], s)
                : launch_tc<T, 1, 8, 4>(seg.a[i], seg.sc[i], seg.log2_bs[i], s);
        break;
    default: two ? launch_decode_lean<T, 2, 4, 3, S>(seg, s) : launch_decode_lean<T, 1, 8, 2, S>(seg, s);
    }
}

// The S products as one decode launch.
template <typename T, int S>
void launch_decode(const slothai_nf4_matmul_args *a, const Scales *sc, const int *log2_bs, cudaStream_t s)
{
    Segments<S> seg;
    seg.tiles_before[0] = 0;
    for (int i = 0; i < S; ++i) {
        seg.a[i] = a[i], seg.sc[i] = sc[i], seg.log2_bs[i] = log2_bs[i];
        seg.tiles_before[i + 1] = seg.tiles_before[i] + (a[i].n + 15) / 16;
    }
    launch_decode<T, S>(seg, s);
}

// Whether the 16-feature-tile kernels (tensor cores) take this product: fp16 / bf16, K a
// multiple of 64, blocks of 64 or more, the codes 8-byte and x 16-byte aligned.
template <typename T> bool tile_kernels_take(const slothai_nf4_matmul_args &a)
{
    return !std::is_same<T, float>::value && a.k % kUnit == 0 && a.w.blocksize >= kUnit &&
           reinterpret_cast<uintptr_t>(a.w.packed) % 8 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
}

template <typename T>
slothai_status run(const slothai_nf4_matmul_args &a, const Scales &sc, int log2_bs, cudaStream_t s)
{
    if constexpr (!std::is_same<T, float>::value) {
        if (tile_kernels_take<T>(a) && tensor_cores_here<T>()) {
            if (a.m <= 16) launch_decode<T, 1>(&a, &sc, &log2_bs, s);
            else if (a.m <= 32) launch_tc<T, 4, 8, 4>(a, sc, log2_bs, s);
            else launch_tc<T, 8, 8, 2>(a, sc, log2_bs, s);
            return cudaGetLastError() == cudaSuccess ? SLOTHAI_OK : SLOTHAI_ECUDA;
        }
    }
    const int64_t groups = (a.m + 7) / 8, max_y = 65535;
    for (int64_t y0 = 0; y0 < groups; y0 += max_y) {
        const dim3 grid((unsigned)((a.n + kWarps - 1) / kWarps), (unsigned)(groups - y0 < max_y ? groups - y0 : max_y));
        nf4_matmul_generic_kernel<T><<<grid, kThreads, 0, s>>>(a, sc, log2_bs, y0 * 8);
    }
    return cudaGetLastError() == cudaSuccess ? SLOTHAI_OK : SLOTHAI_ECUDA;
}

// `count` products sharing x: one decode launch where the decode kernel takes them all,
// else each as run() launches it.
template <typename T>
slothai_status run_group(const slothai_nf4_matmul_args *a, const Scales *sc, const int *log2_bs, int count,
                         cudaStream_t s)
{
    if constexpr (!std::is_same<T, float>::value) {
        bool one = count > 1 && a[0].m <= 16;
        for (int i = 0; one && i < count; ++i) one = tile_kernels_take<T>(a[i]);
        if (one && tensor_cores_here<T>()) {
            count == 2 ? launch_decode<T, 2>(a, sc, log2_bs, s) : launch_decode<T, 3>(a, sc, log2_bs, s);
            return cudaGetLastError() == cudaSuccess ? SLOTHAI_OK : SLOTHAI_ECUDA;
        }
    }
    for (int i = 0; i < count; ++i) {
        const slothai_status st = run<T>(a[i], sc[i], log2_bs[i], s);
        if (st != SLOTHAI_OK) return st;
    }
    return SLOTHAI_OK;
}

// One product's arguments checked; its scales and log2(blocksize). `empty`: nothing to
// compute (no rows or no features: its pointers may be null and are not checked).
slothai_status prepare(const slothai_nf4_matmul_args &a, Scales &sc, int &log2_bs, bool &empty)
{
    if (a.m < 0 || a.n < 0 || a.k < 0 || a.r < 0) return SLOTHAI_EINVAL;
    empty = a.m == 0 || a.n == 0;
    if (empty) return SLOTHAI_OK;
    if ((a.w.absmax_u8 == nullptr) == (a.w.absmax_f32 == nullptr)) return SLOTHAI_EINVAL;
    if (a.lora_x && (!a.lora_b || (a.lora_dtype != a.dtype && a.lora_dtype != SLOTHAI_FLOAT32))) return SLOTHAI_EINVAL;
    log2_bs = log2_exact(a.w.blocksize);
    const int log2_bs2 = a.w.absmax_u8 ? log2_exact(a.w.blocksize2) : 0;
    if (log2_bs < 0 || log2_bs2 < 0 || (a.n + 15) / 16 > 0x7fffffff) return SLOTHAI_EINVAL;
    sc = Scales{a.w.absmax_u8, a.w.absmax_f32, a.w.code2, a.w.absmax2, a.w.offset, 0.0f, log2_bs2};
    return SLOTHAI_OK;
}

} // namespace

extern "C" slothai_status slothai_nf4_matmul_group_cuda(const slothai_nf4_matmul_args *a, int count, void *stream)
{
    if (!a || count < 1 || count > SLOTHAI_NF4_GROUP_MAX) return SLOTHAI_EINVAL;
    slothai_nf4_matmul_args live[SLOTHAI_NF4_GROUP_MAX];
    Scales sc[SLOTHAI_NF4_GROUP_MAX];
    int log2_bs[SLOTHAI_NF4_GROUP_MAX], n = 0;
    for (int i = 0; i < count; ++i) {
        if (a[i].m != a[0].m || a[i].k != a[0].k || a[i].dtype != a[0].dtype || a[i].x != a[0].x)
            return SLOTHAI_EINVAL;
        bool empty = false;
        const slothai_status st = prepare(a[i], sc[n], log2_bs[n], empty);
        if (st != SLOTHAI_OK) return st;
        if (!empty) live[n++] = a[i];
    }
    if (n == 0) return SLOTHAI_OK;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (a[0].dtype) {
    case SLOTHAI_FLOAT32: return run_group<float>(live, sc, log2_bs, n, s);
    case SLOTHAI_FLOAT16: return run_group<__half>(live, sc, log2_bs, n, s);
    case SLOTHAI_BFLOAT16: return run_group<__nv_bfloat16>(live, sc, log2_bs, n, s);
    default: return SLOTHAI_EINVAL;
    }
}

extern "C" slothai_status slothai_nf4_matmul_cuda(const slothai_nf4_matmul_args *a, void *stream)
{
    return slothai_nf4_matmul_group_cuda(a, 1, stream);
}
