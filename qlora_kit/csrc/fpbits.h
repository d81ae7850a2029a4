/* Bit-exact float conversions the native kernels share (quant4.c, quant_search.c, gemv4.c): the same rounding
 * rules as torch, written out so gcc vectorizes them and no kernel depends on F16C. */
#ifndef QLORA_KIT_FPBITS_H
#define QLORA_KIT_FPBITS_H

#include <stdint.h>
#include <string.h>

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Exact for every half, subnormals included: moving exponent and mantissa into place and scaling by
 * 2^(127-15) is a power-of-two multiply. Written out because gcc does not vectorize a _Float16 cast. */
static inline float f16_to_f32(uint32_t h) {
    uint32_t em = h & 0x7fffu, u = em << 13;
    uint32_t r = em >= 0x7c00u ? (u | 0x7f800000u) : to_bits(from_bits(u) * 0x1p112f); /* inf/NaN as is */
    return from_bits(r | (h & 0x8000u) << 16);
}

/* Round to nearest even, NaN to the canonical quiet NaN: torch's float -> bfloat16 rule. */
static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = to_bits(f), rounded = (u + 0x7fffu + (u >> 16 & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

/* IEEE float -> half, round to nearest even, as torch's .to(float16) (checked against the hardware
 * conversion on all 2^32 inputs). Branchless, so a block's 16 table entries convert as one vector. */
static inline uint16_t f32_to_f16(float f) {
    const uint32_t u = to_bits(f), a = u & 0x7fffffffu, sign = u >> 16 & 0x8000u;
    const uint32_t normal = (a - 0x38000000u + 0xfffu + (a >> 13 & 1u)) >> 13; /* rebias, round 13 bits */
    const uint32_t subnormal = to_bits(from_bits(a) + 0.5f) - 0x3f000000u;  /* the FPU rounds to 2^-24 */
    const uint32_t tiny = -(uint32_t)(a < 0x38800000u), inf = -(uint32_t)(a >= 0x477ff000u); /* 65520 rounds up */
    const uint32_t nan = -(uint32_t)(a > 0x7f800000u);
    uint32_t r = (subnormal & tiny) | (normal & ~tiny); /* masks, not ?:, so gcc vectorizes this on AVX2 too */
    r = (0x7c00u & inf) | (r & ~inf);
    r = ((0x7e00u | (a >> 13 & 0x3ffu)) & nan) | (r & ~nan);
    return (uint16_t)(sign | r);
}

#endif
