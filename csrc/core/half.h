/*
 * fp16 / bf16 <-> fp32 conversions for the C reference paths, bit-exact with
 * the hardware (and torch): round to nearest-even, NaN stays NaN, overflow to inf.
 */
#ifndef SLOTHAI_CORE_HALF_H
#define SLOTHAI_CORE_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint32_t slothai_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float slothai_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t slothai_f32_to_bf16(float f)
{
    uint32_t u = slothai_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet and a NaN */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float slothai_bf16_to_f32(uint16_t h) { return slothai_bits_f32((uint32_t)h << 16); }

static inline uint16_t slothai_f32_to_f16(float f)
{
    uint32_t u = slothai_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u >= 0x47800000u) /* >= 2^16: inf, NaN, or overflow to inf */
        return sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (u < 0x38800000u) { /* below 2^-14: a half subnormal (or zero) */
        /* Adding 0.5 leaves an ulp of 2^-24, the subnormal step: the FPU rounds. */
        float a = slothai_bits_f32(u) + 0.5f;
        return sign | (uint16_t)(slothai_f32_bits(a) - 0x3f000000u);
    }
    /* Rebias the exponent (127 -> 15) and round the 13 dropped bits to even. */
    u += (uint32_t)(15 - 127) * (1u << 23) + 0xfffu + ((u >> 13) & 1u);
    return sign | (uint16_t)(u >> 13);
}

static inline float slothai_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1fu) return slothai_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in fp32 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return slothai_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

#endif /* SLOTHAI_CORE_HALF_H */
