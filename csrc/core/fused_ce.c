/*
 * Cross-entropy rows, the C reference (CPU). Formula: slothai_fused_ce_rows_args in
 * slothai.h. Per row: two reads of the logits (max, smoothing sum and argmax, then
 * sum of exponentials) and, with a gradient, a third read and one write in place.
 * Sums in double so the reference stays accurate at vocabularies of 256K.
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

/* Whether y at index j beats the best so far for torch.argmax: a NaN above every number (the
 * first NaN stays), else the larger value; equal values keep the earlier index (j comes later). */
static int argmax_takes(float y, float best)
{
    return isnan(y) ? !isnan(best) : y > best;
}

/* The row's outputs when it is not computed: an ignored target (v = 0) or a bad one (v = NaN). */
static void skipped_row(const slothai_fused_ce_rows_args *a, void *row, int64_t r, float v)
{
    a->loss[r] = v;
    if (a->z_loss_out) a->z_loss_out[r] = v;
    if (a->accuracy_out) a->accuracy_out[r] = v;
    if (a->argmax_out) a->argmax_out[r] = -1;
    if (a->grad)
        for (int64_t j = 0; j < a->vocab; ++j) store(a, row, j, v);
}

slothai_status slothai_fused_ce_rows_cpu(const slothai_fused_ce_rows_args *a, int64_t row_begin, int64_t row_end)
{
    if (!a || row_begin < 0 || row_end > a->rows || a->vocab <= 0 || a->ld < a->vocab) return SLOTHAI_EINVAL;
    if (a->class_weight && a->label_smoothing != 0.0f && !a->class_weight_sum) return SLOTHAI_EINVAL;
    const int64_t V = a->vocab;
    const float eps = a->label_smoothing;
    const float *w = a->class_weight;
    const int smooth_w = w && eps != 0.0f; /* per-class smoothing terms */
    const int want_argmax = a->argmax_out || a->accuracy_out;
    const float f = a->z_loss_factor ? *a->z_loss_factor : 1.0f;
    for (int64_t r = row_begin; r < row_end; ++r) {
        void *row = (char *)a->logits + (size_t)r * (size_t)a->ld * elem_size(a->dtype);
        const int64_t t = a->target[r];
        if (t == a->ignore_index || t < 0 || t >= V) {
            skipped_row(a, row, r, t == a->ignore_index ? 0.0f : NAN);
            continue;
        }
        /* Pass 1: the max, the (weighted) sum of y for smoothing, the argmax. */
        float m = -INFINITY, best = 0.0f;
        int64_t arg = 0;
        double sum_y = 0.0;
        for (int64_t j = 0; j < V; ++j) {
            const float y = load(a, row, j);
            m = y > m ? y : m;
            sum_y += smooth_w ? (double)w[j] * y : y;
            if (want_argmax && (j == 0 || argmax_takes(y, best))) best = y, arg = j;
        }
        double s = 0.0;
        for (int64_t j = 0; j < V; ++j) s += exp((double)load(a, row, j) - m);
        const float lse = m + (float)log(s);
        const float yt = load(a, row, t);
        const float wt = w ? w[t] : 1.0f;
        const float wsum = smooth_w ? *a->class_weight_sum : 0.0f;
        /* A term whose factor is 0 is left out, not multiplied by 0: a -inf logit makes
         * sum_y -inf (and lse may be inf or NaN), and 0 * inf is NaN where torch, which
         * forms no smoothing or z-loss term when they are off, gives the finite loss. */
        float ce = w ? wt * (1.0f - eps) * (lse - yt) : (1.0f - eps) * (lse - yt);
        if (eps != 0.0f)
            ce += w ? eps / (float)V * (lse * wsum - (float)sum_y) : eps * (lse - (float)(sum_y / (double)V));
        const float zl = a->z_loss != 0.0f ? a->z_loss * lse * lse : 0.0f;
        const float sc = a->token_scaling ? expf(yt - lse) : 1.0f;
        float loss = ce;
        if (a->z_loss != 0.0f) loss += f * zl;
        if (a->token_scaling) loss *= sc;
        a->loss[r] = loss;
        if (a->z_loss_out) a->z_loss_out[r] = a->token_scaling ? sc * zl : zl;
        if (a->argmax_out) a->argmax_out[r] = arg;
        if (a->accuracy_out) a->accuracy_out[r] = arg == t ? 1.0f : 0.0f;
        if (!a->grad) continue;
        const float g = a->token_scaling ? a->grad[r * a->grad_stride] * sc : a->grad[r * a->grad_stride];
        /* dz_j = p_j c1 - smooth_j - [j == t] hit, then the cap's slope and g (slothai.h). */
        float c1, smooth, hit;
        if (w) {
            c1 = wt * (1.0f - eps) + (eps != 0.0f ? eps / (float)V * wsum : 0.0f) + 2.0f * a->z_loss * f * lse;
            smooth = eps / (float)V; /* times w_j below */
            hit = wt * (1.0f - eps);
        } else {
            c1 = 1.0f + 2.0f * a->z_loss * f * lse;
            smooth = eps / (float)V;
            hit = 1.0f - eps;
        }
        for (int64_t j = 0; j < V; ++j) {
            const float y = load(a, row, j);
            float d = expf(y - lse) * c1 - (smooth_w ? smooth * w[j] : smooth) - (j == t ? hit : 0.0f);
            if (a->softcap > 0.0f) d *= 1.0f - (y / a->softcap) * (y / a->softcap);
            store(a, row, j, d * g);
        }
    }
    return SLOTHAI_OK;
}
