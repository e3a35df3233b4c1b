/*
 * slothai core: the one contract between the kernels and everything above them.
 *
 * Plain C linkage, raw pointers, sizes, a stream, a status code back. No torch,
 * no Python: this header and the files that implement it compile on their own
 * (gcc for the CPU reference, nvcc alone for the CUDA kernels).
 */
#ifndef SLOTHAI_CORE_H
#define SLOTHAI_CORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    SLOTHAI_OK = 0,
    SLOTHAI_EINVAL = 1, /* an argument the caller should have checked */
    SLOTHAI_ECUDA = 2   /* a CUDA launch or runtime call failed */
} slothai_status;

/* Floating-point element types of outputs and of logits. */
typedef enum {
    SLOTHAI_FLOAT32 = 0,
    SLOTHAI_FLOAT16 = 1,
    SLOTHAI_BFLOAT16 = 2
} slothai_dtype;

const char *slothai_status_string(slothai_status s);

/* ------------------------------------------------------------------------ */
/* NF4 dequantization                                                        */
/* ------------------------------------------------------------------------ */

/* The 16 NF4 levels, index 0..15, exactly as bitsandbytes stores them. The one
 * copy of the table: the C reference, the CUDA kernel and (through the op) the
 * Python package all read it from here. */
#define SLOTHAI_NF4_LEVELS                                                      \
    {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, \
     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f, \
     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,         \
     0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,          \
     0.7229568362236023f, 1.0f}

/*
 * w[j] = NF4[nibble(j)] * s[j / blocksize], rounded to nearest-even into out_dtype,
 * where nibble(2k) is the high and nibble(2k+1) the low nibble of packed[k], and
 *   s[b] = absmax_f32[b]                                          (plain), or
 *   s[b] = (code2[absmax_u8[b]] * absmax2[b / blocksize2]) + *offset (nested),
 * every step a separately rounded fp32 operation (no FMA), as bitsandbytes does.
 *
 * Exactly one of absmax_u8 / absmax_f32 is set; code2, absmax2, offset only with
 * absmax_u8. blocksize is a power of two >= 32, blocksize2 a power of two.
 * All pointers live on the device the function runs on (offset too).
 */
typedef struct {
    const uint8_t *packed;    /* ceil(numel / 2) bytes */
    const uint8_t *absmax_u8; /* ceil(numel / blocksize) codes (nested) */
    const float *absmax_f32;  /* ceil(numel / blocksize) scales (plain) */
    const float *code2;       /* 256 levels of the nested quantizer */
    const float *absmax2;     /* ceil(nblocks / blocksize2) nested scales */
    const float *offset;      /* 1 value, added after the nested product */
    int64_t numel;
    int64_t blocksize;
    int64_t blocksize2;
    slothai_dtype out_dtype;
    void *out; /* numel elements, contiguous */
} slothai_nf4_args;

/* CPU reference: writes elements [begin, end) of out (callers may split the
 * range across threads). */
slothai_status slothai_dequant_nf4_cpu(const slothai_nf4_args *a, int64_t begin, int64_t end);

/* CUDA: one launch on `stream` (a cudaStream_t), both levels of scales inside. */
slothai_status slothai_dequant_nf4_cuda(const slothai_nf4_args *a, void *stream);

/* ------------------------------------------------------------------------ */
/* Matrix product with an NF4 weight, read 4-bit (decode shapes)             */
/* ------------------------------------------------------------------------ */

/*
 * For x [m, k] and the NF4 weight W [n, k] described by `w` (its packed codes
 * and scales, as for dequantization; w.numel = n * k, w.out / w.out_dtype unused):
 *
 *   out[i, j] = T( sum_c T(NF4[code(j, c)]) * s[(j k + c) / blocksize] * x[i, c]
 *                  + lora_scale * sum_q lora_x[i, q] * lora_b[j, q]   (when lora_x != NULL)
 *                  + bias[j] )                           (when bias != NULL)
 *
 * T() rounds to nearest-even into `dtype` (identity for fp32), s is the block
 * scale of slothai_nf4_args, and the sums are formed in fp32 in any order. The
 * level is rounded into T, not the product level * scale as dequant_nf4 does:
 * the weight enters a tensor-core product as T(level) and its scale multiplies
 * the fp32 partial sum of its block. The error bound is the same (half an ulp
 * of T, relative, per weight); tests hold it to dequant + GEMM's own error.
 *
 * x, lora_x, lora_b, bias and out are contiguous, in `dtype` -- except lora_x and
 * lora_b, in `lora_dtype`: `dtype`, or fp32 over fp16 / bf16 (fp32 LoRA weights, PEFT's
 * default, whose term then enters the fp32 sum unrounded); x is [m, k],
 * lora_x [m, r], lora_b [n, r], out [m, n]. The weight is read once per 64 rows
 * of x: ~0.52 byte a weight (double-quantized), the byte floor of a decode step.
 */
typedef struct {
    slothai_nf4_args w;
    slothai_dtype dtype;
    int64_t m, n, k, r;
    const void *x;
    const void *bias;   /* NULL: none */
    const void *lora_x; /* NULL: no low-rank term */
    const void *lora_b;
    void *out;
    float lora_scale; /* the low-rank term's factor (LoRA's alpha / r), in fp32 */
    slothai_dtype lora_dtype; /* lora_x's and lora_b's: dtype, or SLOTHAI_FLOAT32 */
} slothai_nf4_matmul_args;

/* CPU reference: output features [n_begin, n_end) of every row. */
slothai_status slothai_nf4_matmul_cpu(const slothai_nf4_matmul_args *a, int64_t n_begin, int64_t n_end);

/* CUDA: one launch on `stream` (the scales of both levels inside). */
slothai_status slothai_nf4_matmul_cuda(const slothai_nf4_matmul_args *a, void *stream);

/* `count` products sharing their x (a[i].x, m, k and dtype equal; W, bias, LoRA term,
 * lora_scale and out their own), each as slothai_nf4_matmul_cuda computes it: one
 * launch where the decode kernel serves them all (a layer's q/k/v or gate/up at a
 * decode step: one launch's fixed cost instead of three or two, and one grid filling
 * the card), else one launch each. 1 <= count <= SLOTHAI_NF4_GROUP_MAX. (The CPU
 * reference of a group is slothai_nf4_matmul_cpu per product.) */
#define SLOTHAI_NF4_GROUP_MAX 3
slothai_status slothai_nf4_matmul_group_cuda(const slothai_nf4_matmul_args *a, int count, void *stream);

/* ------------------------------------------------------------------------ */
/* Cross-entropy over rows of logits (the per-row half of fused_ce)          */
/* ------------------------------------------------------------------------ */

/*
 * For each row r of z (`rows` x `vocab`, row stride `ld` elements) with target t:
 *   y_j  = softcap * tanh(z_j / softcap)          (y = z when softcap == 0)
 *   lse  = log sum_j exp(y_j),  p_j = exp(y_j - lse)
 *   ce   = (1 - eps) (lse - y_t) + eps (lse - mean_j y_j)                    (no class weights)
 *   ce   = w_t (1 - eps) (lse - y_t) + eps / vocab sum_j w_j (lse - y_j)       (class weights w)
 *   s    = p_t with token_scaling (a constant: no gradient flows through it), else 1
 *   loss = s (ce + f z_loss lse^2),  f = *z_loss_factor (1 when NULL)
 * and, when grad != NULL, overwrites the row with d loss / d z, times g_r:
 *   dz_j = g_r s [p_j (a + 2 f z_loss lse) - eps / vocab w_j - w_t (1 - eps) [j == t]] * dy_j/dz_j,
 *   a = w_t (1 - eps) + eps / vocab sum_k w_k (= 1 without weights, where w = 1),
 *   dy/dz = 1 - (y / softcap)^2, g_r = grad[r * grad_stride].
 * The class-weighted form is torch's cross_entropy(weight=w, label_smoothing=eps); the z-loss
 * term is not weighted by class (Liger-Kernel's convention), and f lets the caller's mean divide
 * it by the count of rows while the rest is divided by the sum of their w_t (f = sum w_t / count).
 * The eps and z_loss terms are left out when their factor is 0 (not added as
 * 0 * inf at a -inf logit). Rows with t == ignore_index: loss 0, gradient 0
 * (never multiplied by g_r, which may be inf or NaN). Rows with t outside
 * [0, vocab): loss NaN, gradient NaN (never an out-of-bounds read).
 *
 * Per-row outputs, each written only when its pointer is set (none costs a pass
 * of its own: they come out of the pass that forms lse):
 *   z_loss_out[r]   = s z_loss lse^2 (the z-loss term as it enters the loss, before f)
 *   argmax_out[r]   = argmax_j y_j, torch.argmax's: the lowest index among equal maxima,
 *                     a NaN above everything (the first NaN wins), all -inf gives 0
 *   accuracy_out[r] = 1 if argmax_j y_j == t else 0
 * Ignored rows: z 0, accuracy 0, argmax -1. Rows with a bad target: z and accuracy NaN, argmax -1.
 *
 * Memory traffic: the row is read twice (once without a gradient) and written once with a
 * gradient, in `dtype`; class weights add vocab x 4 bytes per pass only with eps != 0 (the
 * per-element terms), else one value per row; the per-row outputs add 4 or 8 bytes a row.
 * All math in fp32; z is read in `dtype` and the gradient written back in it.
 */
typedef struct {
    void *logits;
    slothai_dtype dtype;
    int64_t rows, vocab, ld;
    const int64_t *target;
    int64_t ignore_index;
    float label_smoothing; /* eps */
    float softcap;         /* 0: off */
    float z_loss;
    const float *grad;     /* NULL: loss only */
    int64_t grad_stride;   /* 0: one factor for every row; 1: one per row */
    float *loss;           /* rows */
    /* Options past the plain loss: all NULL / 0 is the plain loss, at its cost. */
    const float *class_weight;     /* vocab weights w (NULL: every class weighs 1) */
    const float *class_weight_sum; /* 1 value, sum_j w_j; read only with class_weight and eps != 0 */
    const float *z_loss_factor;    /* 1 value, f (NULL: 1) */
    int token_scaling;             /* nonzero: s = p_t */
    float *z_loss_out;             /* rows, or NULL */
    float *accuracy_out;           /* rows, or NULL */
    int64_t *argmax_out;           /* rows, or NULL */
} slothai_fused_ce_rows_args;

/* CPU reference: rows [row_begin, row_end). */
slothai_status slothai_fused_ce_rows_cpu(const slothai_fused_ce_rows_args *a, int64_t row_begin, int64_t row_end);

/* CUDA: one launch on `stream`, one thread block per row. */
slothai_status slothai_fused_ce_rows_cuda(const slothai_fused_ce_rows_args *a, void *stream);

/* ------------------------------------------------------------------------ */
/* Scaling by a factor that lives on the device                              */
/* ------------------------------------------------------------------------ */

/*
 * x[i] = round(x[i] * factor) for i in [0, numel), in place, x contiguous in
 * `dtype`: the product formed in fp32 and rounded once into dtype (for fp16 /
 * bf16, a factor first rounded to dtype would scale every element by up to
 * 2^-11 / 2^-8 off). `factor` points at one fp32 value on the device the
 * function runs on and is read there (no host sync). A factor of exactly 1
 * leaves x as it is, unread. An element that is exactly 0 stays 0 whatever the
 * factor, inf and NaN included: fused_ce's backward scales gradients it formed
 * for an upstream 1, and a row with no contribution (an ignored target; every
 * row when none is counted, as in an accumulation window of ignored labels
 * divided by its count of 0) must keep gradient 0, as torch's cross-entropy
 * gives it, not 0 * inf = NaN.
 */
slothai_status slothai_scale_cpu(void *x, slothai_dtype dtype, int64_t begin, int64_t end, const float *factor);

/* CUDA: one launch on `stream`. */
slothai_status slothai_scale_cuda(void *x, slothai_dtype dtype, int64_t numel, const float *factor, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* SLOTHAI_CORE_H */
