/* y = x W^T (+ bias) for a 16-bit (bf16 / fp16) W and a few rows of x: the decode path of the layers a 4-bit model
 * keeps unquantized, above all the LM head -- the largest matrix a small model multiplies per token. Part of the
 * `qlora_kit._gemv4` library (see gemv4.c for the 4-bit weights); loaded with ctypes by _native.py. */
#include "gemv.h"

/* torch's bf16 matmul reads such a W at under half the memory bandwidth at one row; here each weight is widened
 * to fp32 in a register (exact) and multiplied as gemv4.c multiplies: the products are F.linear's, accumulated
 * in fp32 in another order, rounded once to the output dtype. k % 16 == 0. */
typedef void (*dense_fn)(const uint16_t *, int, int64_t, const float *, int64_t, float *);

static void dense_scalar(const uint16_t *wj, int dtype, int64_t k, const float *xf, int64_t m, float *acc) {
    for (int64_t r = 0; r < m; r++) {
        float s = 0.0f;
        for (int64_t c = 0; c < k; c++) s += xf[r * k + c] * load_f32(wj, dtype, c);
        acc[r] = s;
    }
}

#ifdef G4_X86
G4_AVX512 __m512 widen512(const uint16_t *p, int dtype) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (dtype == G4_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

G4_AVX512 void dense512_mr(const uint16_t *wj, int dtype, int64_t k, const float *xf, int mr, float *acc) {
    __m512 a[G4_MAX_ROWS];
    for (int r = 0; r < mr; r++) a[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 16) {
        const __m512 wv = widen512(wj + c, dtype);
        for (int r = 0; r < mr; r++) a[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + r * k + c), a[r]);
    }
    for (int r = 0; r < mr; r++) acc[r] = _mm512_reduce_add_ps(a[r]);
}

__attribute__((target("avx512f,fma"))) static void dense_avx512(const uint16_t *wj, int dtype, int64_t k,
                                                                const float *xf, int64_t m, float *acc) {
    for (int64_t r = 0; r < m;) {
        const int64_t left = m - r;
        const float *x = xf + r * k;
        if (left >= 8) dense512_mr(wj, dtype, k, x, 8, acc + r), r += 8;
        else if (left >= 4) dense512_mr(wj, dtype, k, x, 4, acc + r), r += 4;
        else if (left >= 2) dense512_mr(wj, dtype, k, x, 2, acc + r), r += 2;
        else dense512_mr(wj, dtype, k, x, 1, acc + r), r += 1;
    }
}

G4_BF16DP void dense512bf_mr(const uint16_t *wj, int64_t k, const uint16_t *x, int mr, float *acc) {
    __m512 a[G4_MAX_ROWS];
    for (int r = 0; r < mr; r++) a[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 32) {
        const __m512i wv = _mm512_loadu_si512(wj + c);
        for (int r = 0; r < mr; r++)
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(x + r * k + c));
    }
    for (int r = 0; r < mr; r++) acc[r] = _mm512_reduce_add_ps(a[r]);
}

/* bf16 W and x, k % 32 == 0: the pairs as they lie in memory (x passed as-is, not widened) */
__attribute__((target("avx512f,avx512bw,avx512bf16,fma"))) static void dense_bf16dp(const uint16_t *wj, int64_t k,
                                                                          const uint16_t *x, int64_t m, float *acc) {
    for (int64_t r = 0; r < m;) {
        const int64_t left = m - r;
        const uint16_t *xr = x + r * k;
        if (left >= 8) dense512bf_mr(wj, k, xr, 8, acc + r), r += 8;
        else if (left >= 4) dense512bf_mr(wj, k, xr, 4, acc + r), r += 4;
        else if (left >= 2) dense512bf_mr(wj, k, xr, 2, acc + r), r += 2;
        else dense512bf_mr(wj, k, xr, 1, acc + r), r += 1;
    }
}

G4_AVX2 __m256 widen256(const uint16_t *p, int dtype) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dtype == G4_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

G4_AVX2 void dense256_mr(const uint16_t *wj, int dtype, int64_t k, const float *xf, int mr, float *acc) {
    __m256 a[4];
    for (int r = 0; r < mr; r++) a[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c += 8) {
        const __m256 wv = widen256(wj + c, dtype);
        for (int r = 0; r < mr; r++) a[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xf + r * k + c), a[r]);
    }
    for (int r = 0; r < mr; r++) {
        float s[8];
        _mm256_storeu_ps(s, a[r]);
        acc[r] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
}

__attribute__((target("avx2,fma,f16c"))) static void dense_avx2(const uint16_t *wj, int dtype, int64_t k,
                                                               const float *xf, int64_t m, float *acc) {
    for (int64_t r = 0; r < m;) {
        const int64_t left = m - r;
        const float *x = xf + r * k;
        if (left >= 4) dense256_mr(wj, dtype, k, x, 4, acc + r), r += 4;
        else if (left >= 2) dense256_mr(wj, dtype, k, x, 2, acc + r), r += 2;
        else dense256_mr(wj, dtype, k, x, 1, acc + r), r += 1;
    }
}
#endif

static dense_fn pick_dense(int isa) {
#ifdef G4_X86
    __builtin_cpu_init();
    if (isa >= 2 && __builtin_cpu_supports("avx512f")) return dense_avx512;
    if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) return dense_avx2;
#endif
    (void)isa;
    return dense_scalar;
}

/* y[m, n] = x[m, k] W^T + bias, x, W (n x k), bias and y all in `dtype` (1 bf16, 2 fp16). Returns 0, or -1 for
 * arguments outside what the kernel handles (the caller then calls F.linear). */
int g4_dense(const void *x, int64_t m, int64_t k, int dtype, const uint16_t *w, int64_t n, const void *bias, void *y,
             int isa, int nthreads) {
    if (m < 1 || m > G4_MAX_ROWS || k <= 0 || k % 16 || n <= 0 || (dtype != G4_BF16 && dtype != G4_F16)) return -1;
    float *xf = malloc((size_t)(m * k) * sizeof *xf);
    if (!xf) return -1;
    for (int64_t i = 0; i < m * k; i++) xf[i] = load_f32(x, dtype, i);
    const dense_fn row = pick_dense(isa);
#ifdef G4_X86
    const int bf16dp = dtype == G4_BF16 && k % 32 == 0 && have_bf16dp(isa);
#else
    const int bf16dp = 0;
#endif
    const int nw = workers(n * k, n, nthreads, G4_MIN_PER_THREAD); /* parallel.h */
#pragma omp parallel for schedule(static) num_threads(nw)
    for (int64_t j = 0; j < n; j++) {
        float acc[G4_MAX_ROWS];
#ifdef G4_X86
        if (bf16dp) dense_bf16dp(w + j * k, k, (const uint16_t *)x, m, acc);
        else
#endif
            row(w + j * k, dtype, k, xf, m, acc);
        for (int64_t r = 0; r < m; r++) store(y, dtype, r * n + j, bias ? acc[r] + load_f32(bias, dtype, j) : acc[r]);
    }
    free(xf);
    return 0;
}
