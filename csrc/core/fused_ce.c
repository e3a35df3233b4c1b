/*
 * Cross-entropy rows, the C reference (CPU). Formula: slothai_fused_ce_rows_args in
 * slothai.h. Per row: two reads of the logits (max, then sum of exponentials)
 * and, with a gradient, a third read and one write in place. Sums in double so
 * the reference stays accurate at vocabularies of 256K.
 */
#include <math.h>

#include "half.h"
#include "slothai.h"

static float load(const slothai_fused_ce_rows_args *a, const void *row, int64_t j)
{
    float z;
    switch (a->dtype) {
    case SLOTHAI_FLOAT16: z = slothai_f16_to_f32(((const uint16_t *)row)[j]); break;
    case SLOTHAI_BFLOAT16: z = slothai_bf16_to_f32(((const uint16_t *)row)[j]); break;
    default: z = ((const float *)row)[j]; break;
    }
    return a->softcap > 0.0f ? a->softcap * tanhf(z / a->softcap) : z;
}

static void store(const slothai_fused_ce_rows_args *a, void *row, int64_t j, float v)
{
    switch (a->dtype) {
    case SLOTHAI_FLOAT16: ((uint16_t *)row)[j] = slothai_f32_to_f16(v); break;
    case SLOTHAI_BFLOAT16: ((uint16_t *)row)[j] = slothai_f32_to_bf16(v); break;
    default: ((float *)row)[j] = v; break;
    }
}

static size_t elem_size(slothai_dtype d) { return d == SLOTHAI_FLOAT32 ? 4 : 2; }

slothai_status slothai_fused_ce_rows_cpu(const slothai_fused_ce_rows_args *a, int64_t row_begin, int64_t row_end)
{
    if (!a || row_begin < 0 || row_end > a->rows || a->vocab <= 0 || a->ld < a->vocab) return SLOTHAI_EINVAL;
    const int64_t V = a->vocab;
    const float eps = a->label_smoothing;
    for (int64_t r = row_begin; r < row_end; ++r) {
        void *row = (char *)a->logits + (size_t)r * (size_t)a->ld * elem_size(a->dtype);
        const int64_t t = a->target[r];
        if (t == a->ignore_index || t < 0 || t >= V) {
            const float v = t == a->ignore_index ? 0.0f : NAN;
            a->loss[r] = v;
            if (a->grad)
                for (int64_t j = 0; j < V; ++j) store(a, row, j, v);
            continue;
        }
        float m = -INFINITY;
        double sum_y = 0.0;
        for (int64_t j = 0; j < V; ++j) {
            const float y = load(a, row, j);
            m = y > m ? y : m;
            sum_y += y;
        }
        double s = 0.0;
        for (int64_t j = 0; j < V; ++j) s += exp((double)load(a, row, j) - m);
        const float lse = m + (float)log(s);
        const float yt = load(a, row, t);
        /* A term whose factor is 0 is left out, not multiplied by 0: a -inf logit makes
         * sum_y -inf (and lse may be inf or NaN), and 0 * inf is NaN where torch, which
         * forms no smoothing or z-loss term when they are off, gives the finite loss. */
        float loss = (1.0f - eps) * (lse - yt);
        if (eps != 0.0f) loss += eps * (lse - (float)(sum_y / (double)V));
        if (a->z_loss != 0.0f) loss += a->z_loss * lse * lse;
        a->loss[r] = loss;
        if (!a->grad) continue;
        const float g = a->grad[r * a->grad_stride];
        const float c1 = 1.0f + 2.0f * a->z_loss * lse;
        for (int64_t j = 0; j < V; ++j) {
            const float y = load(a, row, j);
            float d = expf(y - lse) * c1 - eps / (float)V - (j == t ? 1.0f - eps : 0.0f);
            if (a->softcap > 0.0f) d *= 1.0f - (y / a->softcap) * (y / a->softcap);
            store(a, row, j, d * g);
        }
    }
    return SLOTHAI_OK;
}
