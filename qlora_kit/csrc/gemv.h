/* What the few-row kernels share (gemv4.c: a 4-bit W; gemv16.c: a 16-bit W): dtypes, loads and stores in fp32,
 * the row limit, the threading threshold and the instruction-set attributes. One library, `qlora_kit._gemv4`. */
#ifndef QLORA_KIT_GEMV_H
#define QLORA_KIT_GEMV_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fpbits.h"
#include "parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define G4_X86 1
#endif

enum { G4_F32 = 0, G4_BF16 = 1, G4_F16 = 2 };
enum { G4_CHUNK = 32, G4_NCODES = 16, G4_MAX_ROWS = 16, G4_NESTED_BS = 256 };

/* Below this many weights per thread a second thread costs more (wake-up, join) than it saves. */
enum { G4_MIN_PER_THREAD = 1 << 17 };

static inline float load_f32(const void *src, int dtype, int64_t i) {
    if (dtype == G4_BF16) return from_bits((uint32_t)((const uint16_t *)src)[i] << 16);
    if (dtype == G4_F16) return f16_to_f32(((const uint16_t *)src)[i]);
    return ((const float *)src)[i];
}

static inline void store(void *dst, int dtype, int64_t i, float v) {
    if (dtype == G4_BF16) ((uint16_t *)dst)[i] = f32_to_bf16(v);
    else if (dtype == G4_F16) ((uint16_t *)dst)[i] = f32_to_f16(v);
    else ((float *)dst)[i] = v;
}

/* What an fp32 value becomes when the dequantize path rounds it to the activation dtype, back in fp32. */
static inline float as_dtype(float v, int dtype) {
    if (dtype == G4_BF16) return from_bits((uint32_t)f32_to_bf16(v) << 16);
    if (dtype == G4_F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

#ifdef G4_X86
#define G4_AVX512 __attribute__((target("avx512f,fma"), always_inline)) static inline
#define G4_BF16DP __attribute__((target("avx512f,avx512bw,avx512bf16,fma"), always_inline)) static inline
#define G4_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

/* Whether `isa` allows, and the CPU has, AVX-512 BF16 (vdpbf16ps) and BW (16-bit lanes; every BF16 CPU has it). */
static inline int have_bf16dp(int isa) {
    __builtin_cpu_init();
    return isa >= 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}
#endif

#endif
