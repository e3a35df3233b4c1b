/*
 * In-place scaling by a factor read from memory, the C reference (CPU).
 * Formula: slothai_scale_cpu in slothai.h. One read and one write per element.
 */
#include "half.h"
#include "slothai.h"

slothai_status slothai_scale_cpu(void *x, slothai_dtype dtype, int64_t begin, int64_t end, const float *factor)
{
    if (begin < 0 || end < begin) return SLOTHAI_EINVAL;
    if (begin == end) return SLOTHAI_OK; /* an empty tensor may have no data pointer */
    if (!x || !factor) return SLOTHAI_EINVAL;
    const float g = *factor;
    if (g == 1.0f) return SLOTHAI_OK;
    switch (dtype) {
    case SLOTHAI_FLOAT32:
        for (int64_t i = begin; i < end; ++i) {
            float *p = (float *)x + i;
            if (*p != 0.0f) *p *= g;
        }
        return SLOTHAI_OK;
    case SLOTHAI_FLOAT16:
        for (int64_t i = begin; i < end; ++i) {
            uint16_t *p = (uint16_t *)x + i;
            const float v = slothai_f16_to_f32(*p);
            if (v != 0.0f) *p = slothai_f32_to_f16(v * g);
        }
        return SLOTHAI_OK;
    case SLOTHAI_BFLOAT16:
        for (int64_t i = begin; i < end; ++i) {
            uint16_t *p = (uint16_t *)x + i;
            const float v = slothai_bf16_to_f32(*p);
            if (v != 0.0f) *p = slothai_f32_to_bf16(v * g);
        }
        return SLOTHAI_OK;
    }
    return SLOTHAI_EINVAL;
}
