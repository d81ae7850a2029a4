/* What xent.c and rmsnorm.c share: loads and stores of 32- or 16-bit floats through fp32 (torch's rounding), and
 * a branch-free e^x for x <= 0 that gcc vectorizes. Each helper is forced inline, so every target clone of a caller
 * compiles it for its own instruction set, and a dtype passed as a constant folds the branches away. */
#ifndef QLORA_KIT_VECMATH_H
#define QLORA_KIT_VECMATH_H

#include <stdint.h>

#include "fpbits.h"

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 }; /* qlora_kit._native._DTYPE_CODES */

#define VM_INLINE static inline __attribute__((always_inline))

VM_INLINE float load_f(const void *src, int dtype, int64_t i) {
    if (dtype == DT_BF16) return from_bits((uint32_t)((const uint16_t *)src)[i] << 16);
    if (dtype == DT_F16) return f16_to_f32(((const uint16_t *)src)[i]);
    return ((const float *)src)[i];
}

VM_INLINE void store_f(void *dst, int dtype, int64_t i, float v) {
    if (dtype == DT_BF16) ((uint16_t *)dst)[i] = f32_to_bf16(v);
    else if (dtype == DT_F16) ((uint16_t *)dst)[i] = f32_to_f16(v);
    else ((float *)dst)[i] = v;
}

/* v rounded to `dtype` and back: what a 16-bit intermediate tensor holds. */
VM_INLINE float round_to(int dtype, float v) {
    if (dtype == DT_BF16) return from_bits((uint32_t)f32_to_bf16(v) << 16);
    if (dtype == DT_F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

/* e^x for x <= 0 (a softmax's x - max), 0 below the smallest normal float's log (torch gives a subnormal or 0
 * there: nothing a softmax can tell apart). Cody-Waite reduction by ln 2 and Cephes' degree-6 polynomial, within
 * 2 ulp (torch's Sleef exp: 1); the rounding to n is the 1.5 * 2^23 trick, exact in IEEE order. Branch-free, so
 * gcc vectorizes callers. */
VM_INLINE float exp_nonpositive(float x) {
    const float lo = -87.33654f; /* ln(2^-126) */
    const float xc = x < lo ? lo : x;
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const float e = y * from_bits((uint32_t)((int32_t)n + 127) << 23);
    return x < lo ? 0.0f : e;
}

#endif
