/* Blockwise 4-bit (NF4 / FP4) quantize and dequantize on CPU, bit-identical to bitsandbytes; and at the end of
 * the file the 8-bit blockwise pair that double quantization applies to the absmax values, likewise.
 *
 * The 4-bit reference is bitsandbytes' torch kernels (backends/default/ops.py): an fp32 absmax per block, a
 * reciprocal-then-multiply scale for full blocks but a true division for the tail block, torch.bucketize
 * against the 15 code midpoints, and code[q] * absmax in fp32 on the way back. Every float operation here
 * is that same IEEE operation, so results match to the bit. Hence: never build this file with -ffast-math,
 * flush-to-zero or FMA contraction (the 1e-38 clamp is a float32 subnormal).
 *
 * The tables (bounds, order, code) come from the caller: qlora_kit/codes.py holds bitsandbytes' 16 levels
 * and _native._tables derives the midpoints and order from them as bitsandbytes does (tests check both
 * against bitsandbytes), so the same tables reach this file and the torch fallback. Plain C over raw
 * pointers, loaded with ctypes: no Python or torch headers. q4_abi_version() reports Q4_ABI_VERSION, which
 * _native.py checks before it calls anything: change a signature, bump both.
 *
 * Speed: the bucket search is a branchless sum over 15 compares that gcc vectorizes across elements; the
 * hot loops have fixed widths, so they carry no remainder code; dequantize looks codes up 16 at a time with
 * byte shuffles; each hot function is compiled for AVX-512, AVX2, SSE4 and baseline x86-64 and picked at
 * load time (target_clones rather than -march=native, so a wheel runs anywhere); blocks are split across
 * OpenMP threads once per call.
 */
#include <stdint.h>
#include <string.h>

#include "clones.h"
#include "fpbits.h"
#include "parallel.h"

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define Q4_ABI_VERSION 1


int q4_abi_version(void) { return Q4_ABI_VERSION; }

enum { Q4_F32 = 0, Q4_BF16 = 1, Q4_F16 = 2 };
enum { Q4_NBOUNDS = 15, Q4_NCODES = 16 };
enum { Q4_W = 32 }; /* every bitsandbytes blocksize is a multiple of this; see full_block */

/* The bucket search in the form that vectorizes: code = base + the sum of step[j] over the bounds below x.
 * Bounds are sorted, so the sum telescopes to order[count] and FP4's remap costs nothing extra. */
typedef struct {
    float bound[Q4_NBOUNDS];
    int32_t step[Q4_NBOUNDS];
    int32_t base;
} q4_table;

static inline float load_f32(const void *src, int dtype, int64_t i) {
    if (dtype == Q4_BF16) return from_bits((uint32_t)((const uint16_t *)src)[i] << 16);
    if (dtype == Q4_F16) return f16_to_f32(((const uint16_t *)src)[i]);
    return ((const float *)src)[i];
}

/* Elements 2i and 2i+1, the two nibbles of output byte i. A 16-bit pair is read as one 32-bit word so both
 * values land in the same vector lane (for bf16 a shift and a mask are the whole conversion). */
static inline void load_pair(const void *src, int dtype, int64_t i, float *x0, float *x1) {
    if (dtype == Q4_F32) {
        *x0 = ((const float *)src)[2 * i];
        *x1 = ((const float *)src)[2 * i + 1];
        return;
    }
    uint32_t w;
    memcpy(&w, (const uint16_t *)src + 2 * i, sizeof w);
    *x0 = dtype == Q4_BF16 ? from_bits(w << 16) : f16_to_f32(w & 0xffffu);
    *x1 = dtype == Q4_BF16 ? from_bits(w & 0xffff0000u) : f16_to_f32(w >> 16);
}

/* torch.bucketize(x, bounds, right=False), remapped. `!(b >= x)` rather than `b < x` because bucketize puts
 * NaN above every bound. bitsandbytes clamps x to [-1, 1] first; with every bound inside [-1, 1] (checked in
 * q4_quantize) the clamp cannot change the count, so it is left out. */
static inline int32_t bucket(float x, const q4_table *t) {
    int32_t q = t->base;
#pragma GCC unroll 15
    for (int j = 0; j < Q4_NBOUNDS; j++) q += t->step[j] & -(int32_t)!(t->bound[j] >= x);
    return q;
}

/* |x| as bits: as integers these order like the floats, and NaN (above inf) wins, as in torch.max. */
static inline uint32_t abs_bits(float x) { return to_bits(x) & 0x7fffffffu; }

/* A full block whose size is a multiple of Q4_W, scaled by the reciprocal as bitsandbytes does for full
 * blocks. The fixed-width inner loops vectorize without remainder code, which at blocksize 64 would
 * otherwise cost as much as the math. Returns the block's absmax. */
static inline float full_block(const void *src, int dtype, int64_t off, int64_t bs, const q4_table *t,
                               uint8_t *restrict packed) {
    uint32_t m[Q4_W] = {0}, mm = 0; /* per-lane maxima: no cross-lane dependency in the loop */
    for (int64_t c = 0; c < bs; c += Q4_W)
        for (int i = 0; i < Q4_W; i++) {
            uint32_t u = abs_bits(load_f32(src, dtype, off + c + i));
            m[i] = u > m[i] ? u : m[i];
        }
    for (int i = 0; i < Q4_W; i++) mm = m[i] > mm ? m[i] : mm;
    const float am = from_bits(mm), recip = 1.0f / (am < 1e-38f ? 1e-38f : am);
    for (int64_t c = 0; c < bs; c += Q4_W) {
        int32_t q[Q4_W / 2];
        for (int i = 0; i < Q4_W / 2; i++) {
            float x0, x1;
            load_pair(src, dtype, (off + c) / 2 + i, &x0, &x1);
            q[i] = bucket(x0 * recip, t) << 4 | bucket(x1 * recip, t);
        }
        for (int i = 0; i < Q4_W / 2; i++) packed[(off + c) / 2 + i] = (uint8_t)q[i];
    }
    return am;
}

/* Any other block: the tail, which bitsandbytes scales by a division and whose stored absmax is the clamped
 * one, or a blocksize that is not a multiple of Q4_W. At most one block per tensor for bitsandbytes'
 * blocksizes, so plain loops. An odd length is padded with +0.0, as torch's pad does. */
static float other_block(const void *src, int dtype, int64_t off, int64_t len, int tail, const q4_table *t,
                         uint8_t *packed) {
    uint32_t mm = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t u = abs_bits(load_f32(src, dtype, off + i));
        mm = u > mm ? u : mm;
    }
    const float am = from_bits(mm), div = am < 1e-38f ? 1e-38f : am, recip = 1.0f / div;
    for (int64_t i = 0; i < len; i += 2) {
        float x0 = load_f32(src, dtype, off + i), x1 = i + 1 < len ? load_f32(src, dtype, off + i + 1) : 0.0f;
        x0 = tail ? x0 / div : x0 * recip;
        x1 = i + 1 == len ? 0.0f : tail ? x1 / div : x1 * recip;
        packed[(off + i) / 2] = (uint8_t)(bucket(x0, t) << 4 | bucket(x1, t));
    }
    return tail ? div : am;
}

/* The dtype test is hoisted out of the block loop so that each instantiation specializes on it. */
#define Q4_QUANT_BLOCKS(DT)                                                                       \
    for (int64_t b = b0; b < b1; b++) {                                                           \
        int64_t off = b * bs, len = n - off < bs ? n - off : bs;                                  \
        absmax[b] = len == bs && bs % Q4_W == 0 ? full_block(src, DT, off, bs, t, packed)         \
                                                : other_block(src, DT, off, len, len < bs, t, packed); \
    }

KERNEL_CLONES
static void quant_range(const void *src, int dtype, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                        const q4_table *table, uint8_t *restrict packed, float *restrict absmax) {
    const q4_table local = *table, *t = &local; /* a private copy, so the byte stores cannot alias it */
    if (dtype == Q4_BF16) {
        Q4_QUANT_BLOCKS(Q4_BF16)
    } else if (dtype == Q4_F16) {
        Q4_QUANT_BLOCKS(Q4_F16)
    } else {
        Q4_QUANT_BLOCKS(Q4_F32)
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#define Q4_SHUFFLE 1 /* gcc's __builtin_shuffle: one pshufb per 16 table lookups from SSSE3 on */
typedef uint8_t u8x16 __attribute__((vector_size(16)));
static const u8x16 Q4_ZIP_LO = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
static const u8x16 Q4_ZIP_HI = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* Interleave a and b byte by byte: a0 b0 a1 b1 ... into *lo (first half) and *hi. */
static inline void zip(u8x16 a, u8x16 b, u8x16 *lo, u8x16 *hi) {
    *lo = __builtin_shuffle(a, b, Q4_ZIP_LO);
    *hi = __builtin_shuffle(a, b, Q4_ZIP_HI);
}

/* 16 packed bytes -> 32 16-bit values, through a 16-entry table held as its low bytes and its high bytes:
 * put the 32 codes in element order, look up both bytes of each value, zip them into little-endian
 * 16-bit lanes. Ten shuffles for 32 elements where scalar code needs 32 loads and 32 stores. */
static inline void lookup32(const uint8_t *in, u8x16 table_lo, u8x16 table_hi, uint16_t *out) {
    u8x16 x, codes[2], lo, hi;
    memcpy(&x, in, sizeof x);
    zip(x >> 4, x & 15, &codes[0], &codes[1]);
    for (int h = 0; h < 2; h++) {
        zip(__builtin_shuffle(table_lo, codes[h]), __builtin_shuffle(table_hi, codes[h]), &lo, &hi);
        memcpy(out + 16 * h, &lo, sizeof lo);
        memcpy(out + 16 * h + 8, &hi, sizeof hi);
    }
}
#endif

static inline int code_at(const uint8_t *in, int64_t i) { return in[i / 2] >> (i % 2 ? 0 : 4) & 15; }

/* A block's 16 outputs rounded to bf16 or fp16. Kept as loops (not unrolled) so each becomes one vector op. */
static inline void round_table(const float lut[Q4_NCODES], int dtype, uint16_t out[Q4_NCODES]) {
    if (dtype == Q4_BF16) {
#pragma GCC unroll 1
        for (int k = 0; k < Q4_NCODES; k++) out[k] = f32_to_bf16(lut[k]);
    } else {
#pragma GCC unroll 1
        for (int k = 0; k < Q4_NCODES; k++) out[k] = f32_to_f16(lut[k]);
    }
}

static inline void lookup_u16(const uint8_t *in, int64_t len, const uint16_t table[Q4_NCODES], uint16_t *out) {
    int64_t i = 0;
#ifdef Q4_SHUFFLE
    uint8_t lo[Q4_NCODES], hi[Q4_NCODES];
    for (int k = 0; k < Q4_NCODES; k++) {
        lo[k] = (uint8_t)table[k];
        hi[k] = (uint8_t)(table[k] >> 8);
    }
    u8x16 table_lo, table_hi;
    memcpy(&table_lo, lo, sizeof table_lo);
    memcpy(&table_hi, hi, sizeof table_hi);
    for (; i + 32 <= len; i += 32) lookup32(in + i / 2, table_lo, table_hi, out + i);
#endif
    for (; i < len; i++) out[i] = table[code_at(in, i)];
}

static inline void lookup_f32(const uint8_t *in, int64_t len, const float table[Q4_NCODES], float *out) {
    for (int64_t i = 0; i < len / 2; i++) {
        out[2 * i] = table[in[i] >> 4];
        out[2 * i + 1] = table[in[i] & 15];
    }
    if (len % 2) out[len - 1] = table[in[len / 2] >> 4];
}

/* Each block has only 16 possible outputs, code[k] * absmax: the same fp32 product bitsandbytes forms per
 * element, formed and rounded once per block here, so the element loop is a table lookup. */
KERNEL_CLONES
static void dequant_range(const uint8_t *restrict packed, const float *restrict absmax, int64_t n, int64_t bs,
                          int64_t b0, int64_t b1, const float *code, int dtype, void *restrict dst) {
    for (int64_t b = b0; b < b1; b++) {
        const int64_t off = b * bs, len = n - off < bs ? n - off : bs;
        float lut[Q4_NCODES];
        uint16_t lut16[Q4_NCODES];
        for (int k = 0; k < Q4_NCODES; k++) lut[k] = code[k] * absmax[b];
        if (dtype == Q4_F32) {
            lookup_f32(packed + off / 2, len, lut, (float *)dst + off);
        } else {
            round_table(lut, dtype, lut16);
            lookup_u16(packed + off / 2, len, lut16, (uint16_t *)dst + off);
        }
    }
}

/* Fresh output pages would each take a page fault on first write -- for a 128 MiB output that costs more
 * than the conversion itself. Asking for transparent huge pages cuts the faults 512-fold. Only whole 2 MiB
 * pages inside the buffer are touched, and it is only a hint. */
static void want_huge_pages(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

enum { Q4_MIN_PER_THREAD = 1 << 18 }; /* see workers() in parallel.h */

static int valid(int dtype, int64_t n, int64_t bs) {
    return (dtype == Q4_F32 || dtype == Q4_BF16 || dtype == Q4_F16) && n >= 0 && bs > 0 && bs % 2 == 0;
}

/* Quantize n elements of `src` (dtype 0 fp32, 1 bf16, 2 fp16) in blocks of `blocksize` (even).
 * bounds: the 15 sorted midpoints, all within [-1, 1]; order: the 16-entry code permutation, applied when
 * `remap` (FP4). Writes ceil(n/2) bytes to packed_out, the first element in the high nibble, and
 * ceil(n/blocksize) floats to absmax_out. Returns 0, or -1 for invalid arguments. */
int q4_quantize(const void *src, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                const uint8_t *order, int remap, uint8_t *packed_out, float *absmax_out, int nthreads) {
    if (!valid(dtype, n, blocksize)) return -1;
    q4_table t;
    t.base = remap ? order[0] : 0;
    for (int j = 0; j < Q4_NBOUNDS; j++) {
        if (!(bounds[j] >= -1.0f && bounds[j] <= 1.0f) || (j && bounds[j] < bounds[j - 1])) return -1;
        t.bound[j] = bounds[j];
        t.step[j] = remap ? (int32_t)order[j + 1] - (int32_t)order[j] : 1;
    }
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    want_huge_pages(packed_out, (n + 1) / 2);
    want_huge_pages(absmax_out, nblocks * (int64_t)sizeof(float));
#pragma omp parallel num_threads(workers(n, nblocks, nthreads, Q4_MIN_PER_THREAD))
    {
        int64_t b0, b1;
        my_blocks(nblocks, &b0, &b1);
        quant_range(src, dtype, n, blocksize, b0, b1, &t, packed_out, absmax_out);
    }
    return 0;
}

/* Inverse of q4_quantize: out = code[q] * absmax[block] in fp32, rounded to nearest even into the output
 * dtype (0 fp32, 1 bf16, 2 fp16). `code` is the 16-entry table in code order. Returns 0 or -1. */
int q4_dequantize(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize, const float *code,
                  int dtype, void *out, int nthreads) {
    if (!valid(dtype, n, blocksize)) return -1;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    want_huge_pages(out, n * (dtype == Q4_F32 ? 4 : 2));
#pragma omp parallel num_threads(workers(n, nblocks, nthreads, Q4_MIN_PER_THREAD))
    {
        int64_t b0, b1;
        my_blocks(nblocks, &b0, &b1);
        dequant_range(packed, absmax, n, blocksize, b0, b1, code, dtype, out);
    }
    return 0;
}

/* ---- 8-bit blockwise: the nested stage of double quantization ----
 *
 * The reference here is bitsandbytes' CPU C kernel (cquantize_blockwise_cpu_fp32 / cdequantize_blockwise_cpu_fp32
 * in 0.50), which is what its quantize_blockwise / dequantize_blockwise run on CPU, and it does not search for
 * the nearest code as its torch kernel does: it looks the scaled value up in a 65536-entry table over [-1, 1],
 * so values within one table step share a code -- with the dynamic map 0.0 becomes code 131 (2.1e-5), not 127
 * (0.0). What decides bits, all reproduced below: the absmax is a `>` max from -inf, so NaN never wins; a block
 * whose absmax is 0 gets codes 0; every block, the tail included, is scaled by x * (1/absmax); the scaled value
 * is clamped to [-1, 1] and the table index is trunc(fma((v + 1) * 0.5, 65535, 0.5)), a fused multiply-add in
 * bitsandbytes' build, a NaN landing on entry 0. Found by disassembling its libbitsandbytes_cpu.so and checked
 * against it on every float in [-1, 1] (tests/test_native.py keeps the cheap part of that). */
enum { Q8_LUT = 65536, Q8_NCODES = 256, Q8_W = 64 };

/* A nested absmax is 1/64 of its weight (704k values for 4096 x 11008): well under a millisecond of work, which
 * a second thread would turn into a join on a busy machine. Split only far larger inputs. */
enum { Q8_MIN_PER_THREAD = 1 << 21 };

/* The table for a sorted 256-entry code: entry i holds the first code whose midpoint with the next is not
 * below -1 + 2i/65535, as bitsandbytes builds it (the same float operations, in the same order). */
void q8_build_lut(const float *code, uint8_t *lut) {
    float mid[Q8_NCODES - 1];
    for (int k = 0; k < Q8_NCODES - 1; k++) mid[k] = 0.5f * (code[k] + code[k + 1]);
    int k = 0;
    for (int i = 0; i < Q8_LUT; i++) {
        const float v = -1.0f + (2.0f * (float)i) / (float)(Q8_LUT - 1);
        while (k < Q8_NCODES - 1 && mid[k] < v) k++;
        lut[i] = (uint8_t)k;
    }
}

/* The table index of a scaled value. The clamp selects bits under masks (a `?:` on floats does not vectorize),
 * and sends NaN to -1, whose index is 0 as well. The fma is done in double instead, which is exact: v + 1 is a
 * multiple of 2^-24 below 2, so t * 65535 + 0.5 needs under 42 bits, and rounding that exact value to float is
 * the fma's one rounding -- with no need for FMA hardware. */
static inline int32_t q8_index(float v) {
    const uint32_t low = -(uint32_t)!(v >= -1.0f), high = -(uint32_t)(v > 1.0f);
    v = from_bits((to_bits(v) & ~(low | high)) | (to_bits(-1.0f) & low) | (to_bits(1.0f) & high));
    const float t = (v + 1.0f) * 0.5f;
    return (int32_t)(float)((double)t * 65535.0 + 0.5);
}

static inline void q8_block(const float *x, int64_t len, const uint8_t *lut, uint8_t *out, float *absmax) {
    uint32_t m = 0;
    for (int64_t i = 0; i < len; i++) {
        const uint32_t a = abs_bits(x[i]), u = a & -(uint32_t)(a <= 0x7f800000u); /* NaN never wins */
        m = u > m ? u : m;
    }
    const float am = from_bits(m);
    *absmax = am;
    if (am == 0.0f) {
        memset(out, 0, (size_t)len);
        return;
    }
    const float inv = 1.0f / am;
    for (int64_t c = 0; c < len; c += Q8_W) { /* indices a vector at a time, then the table reads */
        const int w = len - c < Q8_W ? (int)(len - c) : Q8_W;
        int32_t idx[Q8_W];
        for (int i = 0; i < w; i++) idx[i] = q8_index(x[c + i] * inv);
        for (int i = 0; i < w; i++) out[c + i] = lut[idx[i]];
    }
}

KERNEL_CLONES
static void q8_quant_range(const float *src, int64_t n, int64_t bs, int64_t b0, int64_t b1, const uint8_t *lut,
                           uint8_t *out, float *absmax) {
    for (int64_t b = b0; b < b1; b++) {
        const int64_t off = b * bs, len = n - off < bs ? n - off : bs;
        q8_block(src + off, len, lut, out + off, absmax + b);
    }
}

KERNEL_CLONES
static void q8_dequant_range(const uint8_t *restrict q, const float *restrict absmax, int64_t n, int64_t bs,
                             int64_t b0, int64_t b1, const float *restrict code, float offset,
                             float *restrict out) {
    for (int64_t b = b0; b < b1; b++) {
        const int64_t off = b * bs, len = n - off < bs ? n - off : bs;
        const float scale = absmax[b];
        for (int64_t i = off; i < off + len; i++) out[i] = code[q[i]] * scale + offset;
    }
}

/* Quantize n fp32 values in blocks of `blocksize` (any positive size) with the table from q8_build_lut: one code
 * per value into out, ceil(n/blocksize) scales into absmax_out. Returns 0, or -1 for invalid arguments. */
int q8_quantize(const float *src, int64_t n, int64_t blocksize, const uint8_t *lut, uint8_t *out, float *absmax_out,
                int nthreads) {
    if (n < 0 || blocksize <= 0) return -1;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel num_threads(workers(n, nblocks, nthreads, Q8_MIN_PER_THREAD))
    {
        int64_t b0, b1;
        my_blocks(nblocks, &b0, &b1);
        q8_quant_range(src, n, blocksize, b0, b1, lut, out, absmax_out);
    }
    return 0;
}

/* out = code[q] * absmax[block] + offset in fp32, the two roundings of bitsandbytes' dequantize followed by
 * torch's `+ offset`. Pass offset -0.0 for none: x + -0.0 is x for every x, -0.0 included. Returns 0 or -1. */
int q8_dequantize(const uint8_t *q, const float *absmax, int64_t n, int64_t blocksize, const float *code, float offset,
                  float *out, int nthreads) {
    if (n < 0 || blocksize <= 0) return -1;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel num_threads(workers(n, nblocks, nthreads, Q8_MIN_PER_THREAD))
    {
        int64_t b0, b1;
        my_blocks(nblocks, &b0, &b1);
        q8_dequant_range(q, absmax, n, blocksize, b0, b1, code, offset, out);
    }
    return 0;
}
