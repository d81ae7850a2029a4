/* y = x W^T (+ bias) for a 4-bit (NF4 / FP4) W and a few rows of x: the decode path, which never builds W.
 *
 * Generating a token multiplies one row of activations (a handful at batch > 1) by every weight matrix. The
 * prefill path -- dequantize W into a dense matrix, then matmul -- reads 4 bits per weight and writes and reads
 * 16 more for every token; here each weight's 4 bits are read once and turned into an fp32 value in a register.
 *
 * The values are the dequantize path's: a block's 16 possible weights, code[q] * absmax, are formed in fp32 as
 * bitsandbytes forms them, and rounded to the activation dtype (bf16 / fp16; fp32 is kept as is), so each weight
 * is exactly the one F.linear(x, dequantize(W, x.dtype)) multiplies by. With double quantization the block's
 * absmax is undone here too, code8[q] * nested_absmax + offset with the nested stage's two roundings. Products
 * are accumulated in fp32 (fused multiply-add); only the order of the additions differs from a BLAS matmul, so
 * the result differs from the reference by accumulation error alone (a few fp32 ulps of sum |x||w|) before the
 * one rounding to the output dtype -- at most one ulp of the output after it, in practice.
 *
 * Layout: x is first copied once per call into fp32, each 32-element chunk split into its even then its odd
 * elements. A chunk of W is 16 bytes whose high nibbles are the even elements and low nibbles the odd ones, so
 * the two 16-lane weight vectors a chunk decodes to line up with the two halves of x's chunk with no shuffles in
 * the hot loop. Requires in_features % 32 == 0 and a blocksize that is a multiple of 32 (every bitsandbytes
 * blocksize), so that no block or row boundary falls inside a chunk; the caller falls back otherwise.
 *
 * Kernels: AVX-512 BF16 for bf16 activations (vdpbf16ps on bf16 pairs; up to four rows of W a pass where rows hold
 * whole blocks of a multiple of 64, see rows_bf16dp, x then split per 64 instead), AVX-512 (a 16-entry table is one
 * permute), AVX2 + FMA + F16C (two permutes and a blend), and portable C,
 * picked at run time with __builtin_cpu_supports. Output rows are split across OpenMP threads.
 */
#include "gemv.h"

/* The interface version _native.py checks before calling anything in this library (bump both with any change of
 * signature or meaning): 2 = LoRA B passed transposed, g4_dense (gemv16.c). */
#define G4_ABI_VERSION 2
int g4_abi_version(void) { return G4_ABI_VERSION; }

/* rows_bf16dp: 64 weights a step (32 bytes), up to four rows of W a pass */
enum { G4_GROUP = 64, G4_PASS_ROWS = 4 };

typedef struct {
    const uint8_t *packed;     /* n*k/2 bytes, first element of a byte in the high nibble */
    const float *absmax;       /* fp32 per block, or NULL with double quantization */
    const uint8_t *qabsmax;    /* double quantization: the 8-bit absmax codes ... */
    const float *nested_absmax; /* ... their fp32 scale per 256 blocks ... */
    const float *nested_code;  /* ... the 256-entry table ... */
    float offset;              /* ... and the mean added back */
    const float *code;         /* the 16 levels */
    int64_t n, k, bs;
    int dtype;                 /* activation = output dtype */
} g4_weight;

static inline float block_absmax(const g4_weight *w, int64_t b) {
    if (w->absmax) return w->absmax[b];
    /* two roundings, as the nested dequantize and the separate `+ offset` have them */
    const float scaled = w->nested_code[w->qabsmax[b]] * w->nested_absmax[b / G4_NESTED_BS];
    return scaled + w->offset;
}

/* A block's 16 weights as the dequantize path holds them. */
static inline void block_table(const g4_weight *w, int64_t b, float lut[G4_NCODES]) {
    const float am = block_absmax(w, b);
    for (int c = 0; c < G4_NCODES; c++) lut[c] = as_dtype(w->code[c] * am, w->dtype);
}

/* ---- kernels: one output row j for `mr` rows of the split x, accumulated into acc[r] ---- */

/* Portable: per chunk, byte i holds element 2i (high nibble, split-x index i) and 2i+1 (low, index 16 + i). */
static void row_scalar(const g4_weight *w, int64_t j, const float *xs, int64_t m, float *acc) {
    const int64_t k = w->k, row0 = j * k;
    /* one division per row: after the first (which may start inside a block that began on the row above),
     * every block starts where the last ended */
    for (int64_t c0 = 0, b = row0 / w->bs; c0 < k; b++) {
        int64_t c1 = (b + 1) * w->bs - row0;
        c1 = c1 < k ? c1 : k;
        float lut[G4_NCODES];
        block_table(w, b, lut);
        for (int64_t c = c0; c < c1; c += G4_CHUNK) {
            const uint8_t *p = w->packed + (row0 + c) / 2;
            for (int64_t r = 0; r < m; r++) {
                const float *x = xs + r * k + c;
                float s = 0.0f;
                for (int i = 0; i < G4_CHUNK / 2; i++) s += x[i] * lut[p[i] >> 4] + x[16 + i] * lut[p[i] & 15];
                acc[r] += s;
            }
        }
        c0 = c1;
    }
}

#ifdef G4_X86
/* AVX-512: the table is one register, a code's weight one permute. MR rows at once share each decoded chunk. */

/* block_table, 16 lanes at once: the products, then the rounding to the activation dtype */
G4_AVX512 __m512 table512(const g4_weight *w, int64_t b) {
    const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(w->code), _mm512_set1_ps(block_absmax(w, b)));
    if (w->dtype == G4_BF16) {
        const __m512i u = _mm512_castps_si512(t);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
        return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
    }
    if (w->dtype == G4_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return t;
}

G4_AVX512 void row512_mr(const g4_weight *w, int64_t j, const float *xs, int mr, float *acc) {
    /* two accumulators per row (even and odd halves of a chunk): at one row a single chain of dependent
     * multiply-adds, not the loads, set the pace */
    const int64_t k = w->k, row0 = j * k;
    __m512 a[G4_MAX_ROWS], b2[G4_MAX_ROWS];
    for (int r = 0; r < mr; r++) a[r] = b2[r] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi32(15);
    /* one division per row: after the first (which may start inside a block that began on the row above),
     * every block starts where the last ended */
    for (int64_t c0 = 0, b = row0 / w->bs; c0 < k; b++) {
        int64_t c1 = (b + 1) * w->bs - row0;
        c1 = c1 < k ? c1 : k;
        const __m512 lut = table512(w, b);
        for (int64_t c = c0; c < c1; c += G4_CHUNK) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w->packed + (row0 + c) / 2)));
            const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            const __m512 wlo = _mm512_permutexvar_ps(_mm512_and_si512(v, nib), lut);
            for (int r = 0; r < mr; r++) {
                const float *x = xs + r * k + c;
                a[r] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(x), a[r]);
                b2[r] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(x + 16), b2[r]);
            }
        }
        c0 = c1;
    }
    for (int r = 0; r < mr; r++) acc[r] += _mm512_reduce_add_ps(_mm512_add_ps(a[r], b2[r]));
}

__attribute__((target("avx512f,fma"))) static void row_avx512(const g4_weight *w, int64_t j, const float *xs,
                                                              int64_t m, float *acc) {
    /* compile-time row counts, so the accumulators stay in registers */
    for (int64_t r = 0; r < m;) {
        const int64_t left = m - r;
        const float *x = xs + r * w->k;
        if (left >= 8) row512_mr(w, j, x, 8, acc + r), r += 8;
        else if (left >= 4) row512_mr(w, j, x, 4, acc + r), r += 4;
        else if (left >= 2) row512_mr(w, j, x, 2, acc + r), r += 2;
        else row512_mr(w, j, x, 1, acc + r), r += 1;
    }
}

/* AVX-512 BF16, for bf16 activations: vdpbf16ps multiplies bf16 pairs (exact products, fp32 sums), two weights per
 * lane per instruction. x is read as it lies in memory, element pairs (2i, 2i+1) per 32-bit lane; a chunk's codes
 * give the same pairs by looking the even elements (high nibbles) up in a table holding each level's bf16 bits
 * in the low half of a lane, the odd ones (low nibbles) in one holding them in the high half. The weights are
 * the bf16 values table512 rounds to, so the products are the fp32 path's; only the additions' order differs
 * (and vdpbf16ps flushes denormals, far below any sum's rounding). */

G4_BF16DP void row512bf_mr(const g4_weight *w, int64_t j, const uint16_t *x, int mr, float *acc) {
    /* chunks alternate between two accumulators per row, for the same reason as row512_mr's two */
    const int64_t k = w->k, row0 = j * k;
    __m512 a[2][G4_MAX_ROWS];
    for (int r = 0; r < mr; r++) a[0][r] = a[1][r] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi32(15);
    /* one division per row: after the first (which may start inside a block that began on the row above),
     * every block starts where the last ended */
    for (int64_t c0 = 0, b = row0 / w->bs; c0 < k; b++) {
        int64_t c1 = (b + 1) * w->bs - row0;
        c1 = c1 < k ? c1 : k;
        const __m512i hi = _mm512_castps_si512(table512(w, b)), lo = _mm512_srli_epi32(hi, 16);
        for (int64_t c = c0; c < c1; c += 2 * G4_CHUNK) {
            for (int h = 0; h < 2 && c + h * G4_CHUNK < c1; h++) {
                const int64_t cc = c + h * G4_CHUNK;
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w->packed + (row0 + cc) / 2)));
                const __m512i pairs = _mm512_or_si512(_mm512_permutexvar_epi32(_mm512_srli_epi32(v, 4), lo),
                                                      _mm512_permutexvar_epi32(_mm512_and_si512(v, nib), hi));
                for (int r = 0; r < mr; r++)
                    a[h][r] = _mm512_dpbf16_ps(a[h][r], (__m512bh)pairs, (__m512bh)_mm512_loadu_si512(x + r * k + cc));
            }
        }
        c0 = c1;
    }
    for (int r = 0; r < mr; r++) acc[r] += _mm512_reduce_add_ps(_mm512_add_ps(a[0][r], a[1][r]));
}

__attribute__((target("avx512f,avx512bw,avx512bf16,fma"))) static void row_bf16dp(const g4_weight *w, int64_t j,
                                                                        const uint16_t *x, int64_t m, float *acc) {
    for (int64_t r = 0; r < m;) {
        const int64_t left = m - r;
        const uint16_t *xr = x + r * w->k;
        if (left >= 8) row512bf_mr(w, j, xr, 8, acc + r), r += 8;
        else if (left >= 4) row512bf_mr(w, j, xr, 4, acc + r), r += 4;
        else if (left >= 2) row512bf_mr(w, j, xr, 2, acc + r), r += 2;
        else row512bf_mr(w, j, xr, 1, acc + r), r += 1;
    }
}

/* block_absmax of blocks b .. b+count-1 (count <= 16) into am: in a loop of its own, apart from the vector loop
 * that uses the values -- computed there, one block at a time, the lookups cost a quarter more (and 16 at a time
 * with two gathers, more still). */
static inline void absmax16(const g4_weight *w, int64_t b, int64_t count, float am[16]) {
    for (int64_t i = 0; i < count; i++) am[i] = block_absmax(w, b + i);
}

/* A block's 16 levels as the dequantize path rounds them to bf16, twice over (words 0-15 and 16-31). vcvtne2ps2bf16
 * rounds to nearest even as torch does; it flushes a level that is an fp32 denormal to zero, where torch keeps a
 * bf16 denormal -- which vdpbf16ps would read as zero anyway, so the products are the one-row kernel's. */
G4_BF16DP __m512i table_bf16x2(__m512 code, float am) {
    const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(am));
    return (__m512i)_mm512_cvtne2ps_pbh(t, t);
}

/* Several output rows at once, for a W whose rows hold whole blocks of a multiple of 64 weights (k % blocksize == 0,
 * blocksize % 64 == 0: every bitsandbytes blocksize but 32). Per 64 weights of a row, its 32 bytes are widened to
 * 16-bit lanes (byte i in lane i) and two vpermw look the high and the low nibbles up in the block's 16 levels as
 * bf16 words -- held twice, in words 0-15 and 16-31, so the low nibble needs no mask: vpermw reads five index bits,
 * and the fifth (the high nibble's lowest bit) only picks the copy. The high nibbles are elements 2i, the low ones
 * 2i+1, so x comes split the same way (`xg`: per 64 elements the 32 even ones, then the 32 odd ones) and vdpbf16ps
 * multiplies matching pairs with no shuffle. Each vector of x is loaded once for all `nr` rows. Against the two-row
 * kernel it replaced (dword lanes, two permutes and an OR per 32 weights): 1.5-2.3x at one row of x, 1.1-1.3x at
 * eight, on a Zen 4 core -- which was bound by instructions (4-7 GB/s against ~25 GB/s it reads), not memory. */
G4_BF16DP void rowsbf_mr(const g4_weight *w, int64_t j, const uint16_t *xg, int nr, int mr,
                         float acc[][G4_MAX_ROWS], int64_t r0) {
    /* at one or two rows of x, even and odd elements keep separate accumulators: the dependent chains of
     * multiply-adds, not the decoding, would set the pace otherwise */
    const int na = mr <= 2 ? 2 : 1;
    const int64_t k = w->k, per_row = k / w->bs;
    const uint8_t *p = w->packed + j * k / 2;
    const __m512 code = _mm512_loadu_ps(w->code);
    __m512 a[G4_PASS_ROWS][2][8];
    for (int t = 0; t < nr; t++)
        for (int h = 0; h < na; h++)
            for (int r = 0; r < mr; r++) a[t][h][r] = _mm512_setzero_ps();
    float am[G4_PASS_ROWS][16]; /* the rows' next 16 blocks' absmax */
    for (int64_t c0 = 0, i = 0, b = j * per_row; c0 < k; c0 += w->bs, i++, b++) {
        if (i % 16 == 0)
            for (int t = 0; t < nr; t++) absmax16(w, b + t * per_row, per_row - i < 16 ? per_row - i : 16, am[t]);
        __m512i tab[G4_PASS_ROWS];
        for (int t = 0; t < nr; t++) tab[t] = table_bf16x2(code, am[t][i % 16]);
        for (int64_t c = c0; c < c0 + w->bs; c += G4_GROUP) {
            __m512i ev[G4_PASS_ROWS], od[G4_PASS_ROWS];
            for (int t = 0; t < nr; t++) {
                const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + (t * k + c) / 2)));
                /* the next pass's codes at this column into L1, the one after into L2: without them, cold weights
                 * (a model's layers leave the cache between tokens) came at half this speed -- the hardware
                 * prefetcher does not keep up with four rows' streams */
                _mm_prefetch((const char *)(p + (t * k + c) / 2 + nr * k / 2), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + (t * k + c) / 2 + nr * k), _MM_HINT_T2);
                ev[t] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab[t]);
                od[t] = _mm512_permutexvar_epi16(v, tab[t]);
            }
            for (int r = 0; r < mr; r++) {
                const __m512bh xe = (__m512bh)_mm512_loadu_si512(xg + r * k + c);
                const __m512bh xo = (__m512bh)_mm512_loadu_si512(xg + r * k + c + G4_GROUP / 2);
                for (int t = 0; t < nr; t++) {
                    a[t][0][r] = _mm512_dpbf16_ps(a[t][0][r], (__m512bh)ev[t], xe);
                    a[t][na - 1][r] = _mm512_dpbf16_ps(a[t][na - 1][r], (__m512bh)od[t], xo);
                }
            }
        }
    }
    for (int t = 0; t < nr; t++)
        for (int r = 0; r < mr; r++)
            acc[t][r0 + r] += _mm512_reduce_add_ps(na == 2 ? _mm512_add_ps(a[t][0][r], a[t][1][r]) : a[t][0][r]);
}

/* rows_bf16dp's x: bf16, each 64 elements' even ones first, then the odd ones (n % 64 == 0) */
__attribute__((target("avx512f,avx512bw"))) static void split_bf16(const void *x, int64_t n, uint16_t *xg) {
    const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26,
                                          24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t i = 0; i < n; i += G4_GROUP) {
        const __m512i lo = _mm512_loadu_si512((const uint16_t *)x + i);
        const __m512i hi = _mm512_loadu_si512((const uint16_t *)x + i + 32);
        _mm512_storeu_si512(xg + i, _mm512_permutex2var_epi16(lo, even, hi));
        _mm512_storeu_si512(xg + i + 32, _mm512_permutex2var_epi16(lo, odd, hi));
    }
}

/* Output rows j .. j+count-1 (count <= G4_PASS_ROWS) for all m rows of x, in passes the registers hold: four
 * rows of W at one or two rows of x, two at more, eight rows of x at most per pass. */
__attribute__((target("avx512f,avx512bw,avx512bf16,fma"))) static void rows_bf16dp(
    const g4_weight *w, int64_t j, int64_t count, const uint16_t *xg, int64_t m, float acc[][G4_MAX_ROWS]) {
    for (int64_t t = 0; t < count;) {
        const int nr = count - t >= 4 && m <= 2 ? 4 : count - t >= 2 ? 2 : 1;
        for (int64_t r = 0; r < m;) {
            const int64_t left = m - r;
            const uint16_t *xr = xg + r * w->k;
            float (*at)[G4_MAX_ROWS] = acc + t;
            /* compile-time row counts, so the accumulators stay in registers */
            if (nr == 4) {
                if (left >= 2) rowsbf_mr(w, j + t, xr, 4, 2, at, r), r += 2;
                else rowsbf_mr(w, j + t, xr, 4, 1, at, r), r += 1;
            } else if (nr == 2) {
                if (left >= 8) rowsbf_mr(w, j + t, xr, 2, 8, at, r), r += 8;
                else if (left >= 4) rowsbf_mr(w, j + t, xr, 2, 4, at, r), r += 4;
                else if (left >= 2) rowsbf_mr(w, j + t, xr, 2, 2, at, r), r += 2;
                else rowsbf_mr(w, j + t, xr, 2, 1, at, r), r += 1;
            } else {
                if (left >= 8) rowsbf_mr(w, j + t, xr, 1, 8, at, r), r += 8;
                else if (left >= 4) rowsbf_mr(w, j + t, xr, 1, 4, at, r), r += 4;
                else if (left >= 2) rowsbf_mr(w, j + t, xr, 1, 2, at, r), r += 2;
                else rowsbf_mr(w, j + t, xr, 1, 1, at, r), r += 1;
            }
        }
        t += nr;
    }
}

#endif

#ifdef G4_X86
/* AVX2: a 16-entry table is two 8-entry permutes, the code's bit 3 choosing between them. */

G4_AVX2 __m256 lookup8(__m256i idx, __m256 lo, __m256 hi) {
    const __m256 mask = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* bit 3 -> sign bit */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), mask);
}

G4_AVX2 __m256 table256(const g4_weight *w, int half, float am) {
    const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(w->code + half), _mm256_set1_ps(am));
    if (w->dtype == G4_BF16) {
        const __m256i u = _mm256_castps_si256(t);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
        return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
    }
    if (w->dtype == G4_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return t;
}

G4_AVX2 void row256_mr(const g4_weight *w, int64_t j, const float *xs, int mr, float *acc) {
    const int64_t k = w->k, row0 = j * k;
    __m256 a[4];
    for (int r = 0; r < mr; r++) a[r] = _mm256_setzero_ps();
    const __m256i nib = _mm256_set1_epi32(15);
    /* one division per row: after the first (which may start inside a block that began on the row above),
     * every block starts where the last ended */
    for (int64_t c0 = 0, b = row0 / w->bs; c0 < k; b++) {
        int64_t c1 = (b + 1) * w->bs - row0;
        c1 = c1 < k ? c1 : k;
        const float am = block_absmax(w, b);
        const __m256 lo = table256(w, 0, am), hi = table256(w, 8, am);
        for (int64_t c = c0; c < c1; c += G4_CHUNK) {
            const uint8_t *p = w->packed + (row0 + c) / 2;
            for (int h = 0; h < 2; h++) { /* bytes 8h..8h+7: even elements 8h.., odd elements 8h.. */
                int64_t word;
                memcpy(&word, p + 8 * h, sizeof word);
                const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(word));
                const __m256 whi = lookup8(_mm256_srli_epi32(v, 4), lo, hi);
                const __m256 wlo = lookup8(_mm256_and_si256(v, nib), lo, hi);
                for (int r = 0; r < mr; r++) {
                    const float *x = xs + r * k + c + 8 * h;
                    a[r] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(x), a[r]);
                    a[r] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(x + 16), a[r]);
                }
            }
        }
        c0 = c1;
    }
    for (int r = 0; r < mr; r++) {
        float s[8];
        _mm256_storeu_ps(s, a[r]);
        acc[r] += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
}

__attribute__((target("avx2,fma,f16c"))) static void row_avx2(const g4_weight *w, int64_t j, const float *xs, int64_t m,
                                                         float *acc) {
    for (int64_t r = 0; r < m;) {
        const int64_t left = m - r;
        const float *x = xs + r * w->k;
        if (left >= 4) row256_mr(w, j, x, 4, acc + r), r += 4;
        else if (left >= 2) row256_mr(w, j, x, 2, acc + r), r += 2;
        else row256_mr(w, j, x, 1, acc + r), r += 1;
    }
}
#endif

typedef void (*row_fn)(const g4_weight *, int64_t, const float *, int64_t, float *);

static row_fn pick(int isa) {
#ifdef G4_X86
    __builtin_cpu_init();
    if (isa >= 2 && __builtin_cpu_supports("avx512f")) return row_avx512;
    if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) return row_avx2;
#endif
    (void)isa;
    return row_scalar;
}

/* The kernel this machine runs: 3 AVX-512 BF16 (bf16 activations; others take 2), 2 AVX-512, 1 AVX2, 0 C. */
int g4_isa(void) {
    row_fn f = pick(2);
#ifdef G4_X86
    if (have_bf16dp(3)) return 3;
    if (f == row_avx512) return 2;
    if (f == row_avx2) return 1;
#endif
    return 0;
}

/* LoRA adapters fused into the same call: row r of x uses adapter row_adapter[r] (-1: none), whose fp32 factors
 * are A (rank x k) and B given transposed, Bt (rank x n), scaled by `scale`. Each adds what QLinear's unfused path
 * adds: the delta scale * B (A x) in fp32, rounded to the output dtype, added to the rounded base output and
 * rounded again. B comes transposed so that B (A x) is `rank` multiply-adds of whole rows of Bt, vectorised over
 * the outputs, instead of one short dot product (and its horizontal sum) per output per row. */
enum { G4_MAX_RANK = 256 };

/* fp32 dot products for the LoRA factors (A x over k, then B_j . u over the rank): vectorised, since a serial
 * fp32 sum of k products per rank per row cost as much as the 4-bit matmul itself at batch 8. */
typedef float (*dot_fn)(const float *, const float *, int64_t);

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float d = 0.0f;
    for (int64_t i = 0; i < n; i++) d += a[i] * b[i];
    return d;
}

#ifdef G4_X86
__attribute__((target("avx512f,fma"))) static float dot_avx512(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i < n; i += 16) { /* masked tail: lanes past n load zeros */
        const __mmask16 mk = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s[8];
    _mm256_storeu_ps(s, _mm256_add_ps(s0, s1));
    float d = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) d += a[i] * b[i];
    return d;
}
#endif

static dot_fn pick_dot(int isa) {
#ifdef G4_X86
    __builtin_cpu_init();
    if (isa >= 2 && __builtin_cpu_supports("avx512f")) return dot_avx512;
    if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return dot_avx2;
#endif
    (void)isa;
    return dot_scalar;
}

/* d[0..n) += a * v[0..n): the rows of Bt into a row's delta */
typedef void (*axpy_fn)(float *, float, const float *, int64_t);

static void axpy_scalar(float *d, float a, const float *v, int64_t n) {
    for (int64_t j = 0; j < n; j++) d[j] += a * v[j];
}

#ifdef G4_X86
__attribute__((target("avx512f,fma"))) static void axpy_avx512(float *d, float a, const float *v, int64_t n) {
    const __m512 av = _mm512_set1_ps(a);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(d + j, _mm512_fmadd_ps(av, _mm512_loadu_ps(v + j), _mm512_loadu_ps(d + j)));
    for (; j < n; j++) d[j] += a * v[j];
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(float *d, float a, const float *v, int64_t n) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(d + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(v + j), _mm256_loadu_ps(d + j)));
    for (; j < n; j++) d[j] += a * v[j];
}
#endif

static axpy_fn pick_axpy(int isa) {
#ifdef G4_X86
    __builtin_cpu_init();
    if (isa >= 2 && __builtin_cpu_supports("avx512f")) return axpy_avx512;
    if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return axpy_avx2;
#endif
    (void)isa;
    return axpy_scalar;
}

/* One output row from its fp32 sums: round(sum + bias) to the output dtype, plus round(scale * delta) where the
 * row has an adapter, rounded again -- QLinear's unfused path, value by value. Kept out of the matmul loop so that
 * it runs over whole rows, which the compiler vectorises (the conversions are branch-free); at 8 rows of x it was
 * a fifth of a small layer's time done one value at a time. */
typedef void (*finish_fn)(const float *, const void *, const float *, float, int, void *, int64_t);

static inline float bf16_round(float v) { return from_bits((uint32_t)f32_to_bf16(v) << 16); }
static inline float bf16_value(const uint16_t *p, int64_t j) { return from_bits((uint32_t)p[j] << 16); }

/* bf16, the common case, one loop per combination so that each is straight-line code; rounding a value that is
 * already bf16 changes nothing, so round(round(s + b)) is written round(s + b). Other dtypes: the generic loop. */
#define G4_FINISH_BODY                                                                                            \
    if (dtype == G4_BF16) {                                                                                       \
        const uint16_t *restrict b16 = bias;                                                                      \
        uint16_t *restrict y16 = y;                                                                               \
        if (bias && delta)                                                                                        \
            for (int64_t j = 0; j < n; j++)                                                                       \
                y16[j] = f32_to_bf16(bf16_round(sums[j] + bf16_value(b16, j)) + bf16_round(delta[j] * scale));   \
        else if (bias)                                                                                            \
            for (int64_t j = 0; j < n; j++) y16[j] = f32_to_bf16(sums[j] + bf16_value(b16, j));                   \
        else if (delta)                                                                                           \
            for (int64_t j = 0; j < n; j++) y16[j] = f32_to_bf16(bf16_round(sums[j]) + bf16_round(delta[j] * scale)); \
        else                                                                                                      \
            for (int64_t j = 0; j < n; j++) y16[j] = f32_to_bf16(sums[j]);                                         \
        return;                                                                                                   \
    }                                                                                                             \
    for (int64_t j = 0; j < n; j++) {                                                                             \
        float v = as_dtype(bias ? sums[j] + load_f32(bias, dtype, j) : sums[j], dtype);                          \
        if (delta) v += as_dtype(delta[j] * scale, dtype);                                                       \
        store(y, dtype, j, v);                                                                                   \
    }

static void finish_plain(const float *restrict sums, const void *restrict bias, const float *restrict delta,
                         float scale, int dtype, void *restrict y, int64_t n) {
    G4_FINISH_BODY
}

#ifdef G4_X86
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void finish_avx512(
    const float *restrict sums, const void *restrict bias, const float *restrict delta, float scale, int dtype,
    void *restrict y, int64_t n) {
    G4_FINISH_BODY
}
#endif

static finish_fn pick_finish(int isa) {
#ifdef G4_X86
    __builtin_cpu_init();
    if (isa >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) return finish_avx512;
#endif
    (void)isa;
    return finish_plain;
}

/* y[m, n] = x[m, k] W^T + bias (+ the rows' LoRA deltas), in `dtype` (0 fp32, 1 bf16, 2 fp16; x, bias and y share
 * it). W is n x k in the bitsandbytes 4-bit layout: `absmax` fp32 per block, or (absmax NULL) double quantization
 * given by qabsmax, nested_absmax, nested_code and offset. Adapters: n_adapters entries of lora_a / lora_bt /
 * lora_rank / lora_scale, and row_adapter[m] (NULL when n_adapters is 0). `isa` caps the kernel (3 AVX-512 BF16,
 * 2 AVX-512, 1 AVX2, 0 C; tests compare them). Returns 0, or -1 for arguments outside what the kernel handles (the
 * caller then takes the dequantize path). */
int g4_gemm(const void *x, int64_t m, int64_t k, int dtype, const uint8_t *packed, const float *absmax,
            const uint8_t *qabsmax, const float *nested_absmax, const float *nested_code, float offset,
            const float *code, int64_t n, int64_t blocksize, const void *bias, int n_adapters,
            const float *const *lora_a, const float *const *lora_bt, const int64_t *lora_rank,
            const float *lora_scale, const int32_t *row_adapter, void *y, int isa, int nthreads) {
    if (m < 1 || m > G4_MAX_ROWS || k <= 0 || k % G4_CHUNK || n <= 0 || blocksize <= 0 || blocksize % G4_CHUNK)
        return -1;
    if (dtype != G4_F32 && dtype != G4_BF16 && dtype != G4_F16) return -1;
    if (!absmax && !(qabsmax && nested_absmax && nested_code)) return -1;
    for (int a = 0; a < n_adapters; a++)
        if (lora_rank[a] < 1 || lora_rank[a] > G4_MAX_RANK) return -1;
    for (int64_t r = 0; n_adapters && r < m; r++)
        if (row_adapter[r] >= n_adapters) return -1;
    /* fp32 x split per chunk, fp32 x as it is, A x, the sums, the deltas; then bf16 x split per group and the
     * (row, rank) pairs of A x */
    float *xs = malloc((size_t)(2 * m * k + m * G4_MAX_RANK + (n_adapters ? 2 : 1) * m * n) * sizeof *xs +
                       (size_t)(m * k) * sizeof(uint16_t) + (size_t)(m * G4_MAX_RANK) * sizeof(int32_t));
    if (!xs) return -1;
    float *xf = xs + m * k, *u = xf + m * k; /* x in fp32 as it is; per row: A x, the adapter's rank values */
    float *sums = u + m * G4_MAX_RANK;       /* per row: the fp32 sums x W^T, finished by finish_row */
    float *delta = n_adapters ? sums + m * n : NULL; /* per row: B (A x), before the scale */
    uint16_t *xg = (uint16_t *)(sums + (n_adapters ? 2 : 1) * m * n); /* rows_bf16dp's x */
    int32_t *pairs = (int32_t *)(xg + m * k); /* r * G4_MAX_RANK + i for each rank value A x needs */
    const g4_weight w = {packed, absmax, qabsmax, nested_absmax, nested_code, offset, code, n, k, blocksize, dtype};
    const row_fn row = pick(isa);
    const dot_fn dot = pick_dot(isa);
    const axpy_fn axpy = pick_axpy(isa);
    const finish_fn finish = pick_finish(isa);
#ifdef G4_X86
    const int bf16dp = dtype == G4_BF16 && have_bf16dp(isa);
#else
    const int bf16dp = 0;
#endif
    const int grouped = bf16dp && k % blocksize == 0 && blocksize % G4_GROUP == 0; /* rows_bf16dp */
    /* each copy of x only where a kernel reads it: serial work, and at 8 rows of a small layer it cost more than
     * the second thread saved */
    int64_t npairs = 0;
    for (int64_t r = 0; r < m; r++) {
        const int32_t ad = n_adapters ? row_adapter[r] : -1;
        for (int64_t i = 0; ad >= 0 && i < lora_rank[ad]; i++) pairs[npairs++] = (int32_t)(r * G4_MAX_RANK + i);
    }
    if (npairs || !bf16dp) /* fp32 x, for A x and the fp32 kernels */
        for (int64_t i = 0; i < m * k; i++) xf[i] = load_f32(x, dtype, i);
    if (!bf16dp) /* fp32, each chunk's even elements first, then its odd ones */
        for (int64_t c = 0; c < m * k; c += G4_CHUNK)
            for (int i = 0; i < G4_CHUNK / 2; i++) {
                xs[c + i] = xf[c + 2 * i];
                xs[c + 16 + i] = xf[c + 2 * i + 1];
            }
#ifdef G4_X86
    if (grouped) split_bf16(x, m * k, xg);
#endif
    const int nw = workers(n * k, n, nthreads, G4_MIN_PER_THREAD); /* parallel.h */
    const int64_t per_step = grouped ? G4_PASS_ROWS : 1, steps = (n + per_step - 1) / per_step;
    const size_t esize = dtype == G4_F32 ? 4 : 2;
    /* Everything per output split over the threads, the adapters' part included: done by one thread before the
     * split, A x and B (A x) cost ~4 ms a token on the Llama-1B shape (r=16 on every linear). */
#pragma omp parallel num_threads(nw)
    {
        if (npairs) { /* the same for every thread */
#pragma omp for schedule(static)
            for (int64_t q = 0; q < npairs; q++) {
                const int64_t r = pairs[q] / G4_MAX_RANK, i = pairs[q] % G4_MAX_RANK;
                u[pairs[q]] = dot(xf + r * k, lora_a[row_adapter[r]] + i * k, k);
            } /* (its barrier: every thread needs all of A x) */
        }
        int64_t s0, s1; /* this thread's output rows, j0 .. j1 */
        my_blocks(steps, &s0, &s1);
        const int64_t j0 = s0 * per_step, j1 = s1 * per_step < n ? s1 * per_step : n;
        for (int64_t r = 0; r < m && j0 < j1; r++) { /* B (A x) over them, rank by rank */
            const int32_t ad = n_adapters ? row_adapter[r] : -1;
            if (ad < 0) continue;
            float *d = delta + r * n + j0;
            memset(d, 0, (size_t)(j1 - j0) * sizeof *d);
            for (int64_t i = 0; i < lora_rank[ad]; i++)
                axpy(d, u[r * G4_MAX_RANK + i], lora_bt[ad] + i * n + j0, j1 - j0);
        }
        for (int64_t s = s0; s < s1; s++) {
            float acc[G4_PASS_ROWS][G4_MAX_ROWS] = {{0}};
            const int64_t j = s * per_step, count = n - j < per_step ? n - j : per_step;
#ifdef G4_X86
            if (grouped) rows_bf16dp(&w, j, count, xg, m, acc);
            else if (bf16dp) row_bf16dp(&w, j, (const uint16_t *)x, m, acc[0]);
            else
#endif
                row(&w, j, xs, m, acc[0]);
            for (int64_t t = 0; t < count; t++)
                for (int64_t r = 0; r < m; r++) sums[r * n + j + t] = acc[t][r];
        }
        for (int64_t r = 0; r < m && j0 < j1; r++) {
            const int32_t ad = n_adapters ? row_adapter[r] : -1;
            finish(sums + r * n + j0, bias ? (const char *)bias + j0 * esize : NULL,
                   ad >= 0 ? delta + r * n + j0 : NULL, ad >= 0 ? lora_scale[ad] : 0.0f, dtype,
                   (char *)y + (r * n + j0) * esize, j1 - j0);
        }
    }
    free(xs);
    return 0;
}
