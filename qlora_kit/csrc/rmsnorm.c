/* Llama's RMSNorm as one pass forward and one backward, for training on the CPU; qlora_kit/rmsnorm.py calls it.
 *
 * What it replaces: transformers' RMSNorm is eight tensor operations forward (an fp32 copy of the input, its
 * square, a mean, an add, rsqrt, a product, the cast back, the weight) and about twice that under autograd, each
 * a pass over [tokens, hidden] with its threads to wake, and under gradient checkpointing the forward runs twice.
 * Here forward reads the input once and writes the output once, backward likewise, and what backward keeps is
 * the input (and 4 bytes a row) where autograd kept an fp32 copy of it.
 *
 * The arithmetic is torch's, operation for operation and rounding for rounding (the 16-bit normalised value
 * rounded where torch holds it in a 16-bit tensor), except the row sums (the mean of squares, and the backward's
 * dot product), which add 16 lanes and then the lanes where torch's reductions group otherwise. So results equal
 * torch's to fp32 rounding, and 16-bit outputs to one unit in the last place at a few elements in 10^5.
 *
 * Plain C over raw pointers, loaded with ctypes like xent.c; rn_abi_version() reports RN_ABI_VERSION, which
 * rmsnorm.py checks. Never build with -ffast-math: the rounding below relies on IEEE evaluation order.
 */
#include <math.h>
#include <stdint.h>

#include "clones.h"
#include "parallel.h"
#include "vecmath.h"

#define RN_ABI_VERSION 1

enum { RN_LANES = 16 };               /* partial sums: one AVX-512 register's floats */
enum { RN_MIN_PER_THREAD = 1 << 15 }; /* elements per thread below which a second thread costs more than it saves */

int rn_abi_version(void) { return RN_ABI_VERSION; }

/* sum over j < d of f(j), in 16 lanes and then across them (the tail goes to the lanes in turn). */
#define LANE_SUM(d, expr, result)                                                   \
    do {                                                                            \
        float s_[RN_LANES] = {0};                                                   \
        const int64_t full_ = (d) - (d) % RN_LANES;                                 \
        for (int64_t j0 = 0; j0 < full_; j0 += RN_LANES)                            \
            for (int l = 0; l < RN_LANES; l++) { const int64_t j = j0 + l; s_[l] += (expr); } \
        for (int64_t j = full_; j < (d); j++) s_[j - full_] += (expr);              \
        float t_ = 0.0f;                                                            \
        for (int l = 0; l < RN_LANES; l++) t_ += s_[l];                             \
        (result) = t_;                                                              \
    } while (0)

/* transformers' LlamaRMSNorm: h = float(x); r = 1 / sqrt(mean(h * h) + eps); y = w * to_x_dtype(h * r), the
 * product in the promoted dtype of w and x (`ydt`). */
VM_INLINE void rms_forward_rows(const void *restrict x, int xdt, const void *restrict w, int wdt, int ydt,
                                float eps, int64_t d, int64_t r0, int64_t r1, void *restrict y,
                                float *restrict rstd) {
    for (int64_t r = r0; r < r1; r++) {
        const int64_t o = r * d;
        float ss;
        LANE_SUM(d, load_f(x, xdt, o + j) * load_f(x, xdt, o + j), ss);
        const float rs = 1.0f / sqrtf(ss / (float)d + eps);
        rstd[r] = rs;
        for (int64_t j = 0; j < d; j++)
            store_f(y, ydt, o + j, load_f(w, wdt, j) * round_to(xdt, load_f(x, xdt, o + j) * rs));
    }
}

/* The input gradient of the graph above, in autograd's order: gn = to_x_dtype(g * w); the product's two
 * gradients gn * r and, through rsqrt, mean and the square, ((-0.5 * sum(gn * h)) * r^3 / d) * (2 * h); their sum
 * rounded to x's dtype. */
VM_INLINE void rms_backward_rows(const void *restrict x, int xdt, const void *restrict w, int wdt,
                                 const void *restrict g, int gdt, const float *restrict rstd, int64_t d, int64_t r0,
                                 int64_t r1, void *restrict gx) {
    for (int64_t r = r0; r < r1; r++) {
        const int64_t o = r * d;
        const float rs = rstd[r];
        float dot;
        LANE_SUM(d, round_to(xdt, load_f(g, gdt, o + j) * load_f(w, wdt, j)) * load_f(x, xdt, o + j), dot);
        const float gsq = ((-0.5f * dot) * (rs * rs * rs)) / (float)d;
        for (int64_t j = 0; j < d; j++) {
            const float h = load_f(x, xdt, o + j);
            const float gn = round_to(xdt, load_f(g, gdt, o + j) * load_f(w, wdt, j));
            store_f(gx, xdt, o + j, gn * rs + gsq * (2.0f * h));
        }
    }
}

/* One specialisation per dtype combination a model trains with (x and w of one dtype, or a 16-bit x with an
 * fp32 weight), so the loads and stores compile to straight vector code. */
#define BY_DTYPES(xdt, wdt, CALL)                                      \
    do {                                                               \
        if (xdt == DT_BF16 && wdt == DT_BF16) CALL(DT_BF16, DT_BF16, DT_BF16);  \
        else if (xdt == DT_BF16) CALL(DT_BF16, DT_F32, DT_F32);       \
        else if (xdt == DT_F16 && wdt == DT_F16) CALL(DT_F16, DT_F16, DT_F16);  \
        else if (xdt == DT_F16) CALL(DT_F16, DT_F32, DT_F32);         \
        else CALL(DT_F32, DT_F32, DT_F32);                             \
    } while (0)

KERNEL_CLONES
static void rms_forward_part(const void *x, int xdt, const void *w, int wdt, float eps, int64_t d, int64_t r0,
                             int64_t r1, void *y, float *rstd) {
#define FWD(X, W, Y) rms_forward_rows(x, X, w, W, Y, eps, d, r0, r1, y, rstd)
    BY_DTYPES(xdt, wdt, FWD);
#undef FWD
}

KERNEL_CLONES
static void rms_backward_part(const void *x, int xdt, const void *w, int wdt, const void *g, const float *rstd,
                              int64_t d, int64_t r0, int64_t r1, void *gx) {
#define BWD(X, W, Y) rms_backward_rows(x, X, w, W, g, Y, rstd, d, r0, r1, gx)
    BY_DTYPES(xdt, wdt, BWD);
#undef BWD
}

static int valid_pair(int xdt, int wdt) {
    return (xdt == DT_F32 || xdt == DT_BF16 || xdt == DT_F16) && (wdt == xdt || wdt == DT_F32);
}

/* y [rows, d] (dtype: w's when w is 32-bit, else x's) = RMSNorm of x [rows, d] with weight w [d]; rstd[r] = the
 * row's 1 / sqrt(mean square + eps). Returns 0, or -1 for a dtype pair it does not take (nothing written). */
int rn_forward(const void *x, int xdt, const void *w, int wdt, float eps, int64_t rows, int64_t d, void *y,
               float *rstd, int nthreads) {
    if (!valid_pair(xdt, wdt) || rows < 0 || d <= 0) return -1;
#pragma omp parallel num_threads(workers(rows * d, rows, nthreads, RN_MIN_PER_THREAD))
    {
        int64_t r0, r1;
        my_blocks(rows, &r0, &r1);
        rms_forward_part(x, xdt, w, wdt, eps, d, r0, r1, y, rstd);
    }
    return 0;
}

/* gx [rows, d] in x's dtype = the gradient through rn_forward of g (its output's dtype), from its rstd. */
int rn_backward(const void *x, int xdt, const void *w, int wdt, const void *g, const float *rstd, int64_t rows,
                int64_t d, void *gx, int nthreads) {
    if (!valid_pair(xdt, wdt) || rows < 0 || d <= 0) return -1;
#pragma omp parallel num_threads(workers(rows * d, rows, nthreads, RN_MIN_PER_THREAD))
    {
        int64_t r0, r1;
        my_blocks(rows, &r0, &r1);
        rms_backward_part(x, xdt, w, wdt, g, rstd, d, r0, r1, gx);
    }
    return 0;
}
