/*
 * NF4 dequantization, the C reference (CPU).
 *
 * Formula and operation order: see slothai_nf4_args in slothai.h. One pass:
 * per element 0.5 byte of codes read, out_dtype bytes written; per block of
 * `blocksize` elements one scale recovered (1 + 4 + 4 bytes read, cached).
 * Compiled with -ffp-contract=off so that no product-plus-offset becomes an FMA.
 */
#include "slothai.h"
#include "half.h"

static const float kNF4[16] = SLOTHAI_NF4_LEVELS;

static float block_scale(const slothai_nf4_args *a, int64_t b)
{
    if (a->absmax_f32) return a->absmax_f32[b];
    float s = a->code2[a->absmax_u8[b]] * a->absmax2[b / a->blocksize2];
    return s + a->offset[0];
}

#define NIBBLE(packed, j) (((j) & 1) ? ((packed)[(j) >> 1] & 0xf) : ((packed)[(j) >> 1] >> 4))

/* out[j] = lut[nibble(j)] for j in [j, stop): whole bytes in the middle, a
 * lone nibble at either end. */
#define DEFINE_EXPAND(name, T)                                                          \
    static void name(const uint8_t *packed, const T *lut, T *out, int64_t j, int64_t stop) \
    {                                                                                   \
        if (j < stop && (j & 1)) { out[j] = lut[NIBBLE(packed, j)]; ++j; }              \
        for (; j + 1 < stop; j += 2) {                                                  \
            const uint8_t byte = packed[j >> 1];                                        \
            out[j] = lut[byte >> 4];                                                    \
            out[j + 1] = lut[byte & 0xf];                                               \
        }                                                                               \
        if (j < stop) out[j] = lut[NIBBLE(packed, j)];                                  \
    }
DEFINE_EXPAND(expand_f32, float)
DEFINE_EXPAND(expand_u16, uint16_t)

slothai_status slothai_dequant_nf4_cpu(const slothai_nf4_args *a, int64_t begin, int64_t end)
{
    if (!a || begin < 0 || end > a->numel || begin > end) return SLOTHAI_EINVAL;
    for (int64_t j = begin; j < end;) {
        const int64_t b = j / a->blocksize;
        const int64_t stop = (b + 1) * a->blocksize < end ? (b + 1) * a->blocksize : end;
        /* Every element of a block is one of 16 products NF4[c] * s: form them
         * (and their rounded forms) once, then each element is a lookup. */
        const float s = block_scale(a, b);
        float w[16];
        uint16_t h[16];
        for (int c = 0; c < 16; ++c) {
            w[c] = kNF4[c] * s;
            h[c] = a->out_dtype == SLOTHAI_FLOAT16 ? slothai_f32_to_f16(w[c]) : slothai_f32_to_bf16(w[c]);
        }
        switch (a->out_dtype) {
        case SLOTHAI_FLOAT32: expand_f32(a->packed, w, (float *)a->out, j, stop); break;
        case SLOTHAI_FLOAT16:
        case SLOTHAI_BFLOAT16: expand_u16(a->packed, h, (uint16_t *)a->out, j, stop); break;
        default: return SLOTHAI_EINVAL;
        }
        j = stop;
    }
    return SLOTHAI_OK;
}
