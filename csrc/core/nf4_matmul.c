/*
 * x @ W^T with an NF4 weight read 4-bit, the C reference (CPU).
 *
 * Formula: slothai_nf4_matmul_args in slothai.h. For each output feature j in
 * [n_begin, n_end): row j of W is expanded once into fp32 (T(level) * s, one
 * multiply per weight, exact as the tensor-core path's blockwise scaling is in
 * real arithmetic), then each of the m rows of x takes its dot product with it
 * in fp32. Traffic: the weight's codes and scales once, x once per feature (it
 * stays in cache for decode shapes), out once.
 * Compiled with -ffp-contract=off like the rest of the core.
 */
#include <stdlib.h>

#include "slothai.h"
#include "half.h"

static const float kNF4[16] = SLOTHAI_NF4_LEVELS;

static float load(const void *p, slothai_dtype t, int64_t i)
{
    switch (t) {
    case SLOTHAI_FLOAT16: return slothai_f16_to_f32(((const uint16_t *)p)[i]);
    case SLOTHAI_BFLOAT16: return slothai_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

static void store(void *p, slothai_dtype t, int64_t i, float v)
{
    switch (t) {
    case SLOTHAI_FLOAT16: ((uint16_t *)p)[i] = slothai_f32_to_f16(v); break;
    case SLOTHAI_BFLOAT16: ((uint16_t *)p)[i] = slothai_f32_to_bf16(v); break;
    default: ((float *)p)[i] = v;
    }
}

/* A level as the tensor-core path holds it: rounded into the compute dtype. */
static float level(slothai_dtype t, int c)
{
    switch (t) {
    case SLOTHAI_FLOAT16: return slothai_f16_to_f32(slothai_f32_to_f16(kNF4[c]));
    case SLOTHAI_BFLOAT16: return slothai_bf16_to_f32(slothai_f32_to_bf16(kNF4[c]));
    default: return kNF4[c];
    }
}

static float block_scale(const slothai_nf4_args *w, int64_t b)
{
    if (w->absmax_f32) return w->absmax_f32[b];
    float s = w->code2[w->absmax_u8[b]] * w->absmax2[b / w->blocksize2];
    return s + w->offset[0];
}

slothai_status slothai_nf4_matmul_cpu(const slothai_nf4_matmul_args *a, int64_t n_begin, int64_t n_end)
{
    if (!a || n_begin < 0 || n_end > a->n || n_begin > n_end || a->m < 0 || a->k < 0) return SLOTHAI_EINVAL;
    if ((a->w.absmax_u8 == NULL) == (a->w.absmax_f32 == NULL) || a->w.blocksize <= 0) return SLOTHAI_EINVAL;
    if (a->lora_x && (!a->lora_b || a->r < 0 || (a->lora_dtype != a->dtype && a->lora_dtype != SLOTHAI_FLOAT32)))
        return SLOTHAI_EINVAL;
    float lut[16];
    for (int c = 0; c < 16; ++c) lut[c] = level(a->dtype, c);
    float *row = malloc(sizeof(float) * (size_t)(a->k > 0 ? a->k : 1));
    if (!row) return SLOTHAI_EINVAL;
    for (int64_t j = n_begin; j < n_end; ++j) {
        int64_t b = -1;
        float s = 0.0f;
        for (int64_t c = 0; c < a->k; ++c) {
            const int64_t e = j * a->k + c; /* flat element index: blocks and bytes run across rows */
            if (e / a->w.blocksize != b) s = block_scale(&a->w, b = e / a->w.blocksize);
            const uint8_t byte = a->w.packed[e >> 1];
            row[c] = lut[(e & 1) ? (byte & 0xf) : (byte >> 4)] * s;
        }
        for (int64_t i = 0; i < a->m; ++i) {
            float acc = 0.0f;
            for (int64_t c = 0; c < a->k; ++c) acc += row[c] * load(a->x, a->dtype, i * a->k + c);
            if (a->lora_x) {
                float low = 0.0f;
                for (int64_t q = 0; q < a->r; ++q)
                    low += load(a->lora_x, a->lora_dtype, i * a->r + q) * load(a->lora_b, a->lora_dtype, j * a->r + q);
                acc += a->lora_scale * low;
            }
            if (a->bias) acc += load(a->bias, a->dtype, j);
            store(a->out, a->dtype, i * a->n + j, acc);
        }
    }
    free(row);
    return SLOTHAI_OK;
}
