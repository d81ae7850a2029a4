/* Scale search for blockwise 4-bit quantization: per block, the stored scale (absmax) that minimises the block's
 * squared reconstruction error, in the bitsandbytes layout unchanged (same codes, same 16 levels, same scale slots).
 * The error may be weighted per column (sum_i w[col(i)] * (x_i - c_i * scale)^2, w the importance of each input of
 * a linear; see qlora_kit/quant_search.py for why): the nearest-level codes at a given scale do not depend on the
 * weights, only which scale wins does, and Lloyd's closed form becomes <x, c>_w / <c, c>_w.
 *
 * bitsandbytes stores each block's raw max |x| as its scale. Clipping the largest element a little usually lowers
 * the error of all the others, because NF4's levels are spread over [-scale, scale]. Per block we may try a grid
 * of fractions of the raw max (the error as a function of the scale has many local minima, so a grid finds better
 * ones than descent alone), then take Lloyd steps from the best: codes fixed, the best scale is <x, c> / <c, c> in
 * closed form; scale fixed, the best codes are the nearest levels. Each candidate costs a pass over the block, so
 * the caller's default is one Lloyd step and no grid (quant_search.py says what more buys). A candidate is kept only
 * when its error is strictly below the best so far, and the first candidate is bitsandbytes' exact result, so a
 * block is never worse than bitsandbytes'. Scales are capped at the raw max.
 *
 * With double quantization a stored scale is one of the 256 levels of its group, code8[k] * nested_absmax + offset;
 * the nested state (offset, nested absmax) stays bitsandbytes', computed from the raw maxima, and each candidate
 * scale is snapped to its group's nearest level before its error is measured, so the error compared is the error of
 * what a reader will decode. The winning level's index is what gets stored.
 *
 * Errors and dot products are summed in a fixed order (float lanes, then double across lanes) that the torch
 * fallback (qlora_kit/quant_search.py) repeats operation for operation, so the two choose the same bits. The same
 * IEEE rules as quant4.c apply: no -ffast-math, no FMA contraction. The element helpers below repeat quant4.c's
 * (that file belongs to the plain kernels); tests pin them by checking that the first candidate is bitsandbytes'
 * result bit for bit.
 */
#include <stdint.h>
#include <string.h>

#include "fpbits.h"
#include "parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define QS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "arch=x86-64-v2", "default")))
#else
#define QS_CLONES
#endif
/* Inlined into each clone, so the hot loops are compiled for every instruction set the clones target. */
#define QS_INLINE static inline __attribute__((always_inline))

enum { QS_F32 = 0, QS_BF16 = 1, QS_F16 = 2 };
enum { QS_NBOUNDS = 15, QS_NCODES = 16, QS_NLEVELS = 256 };
enum { QS_LANES = 16, QS_MAX_BLOCK = 4096 };
enum { QS_MIN_PER_THREAD = 1 << 16 }; /* several bucket passes per element: worth a thread sooner than quant4.c */

typedef struct {
    float bound[QS_NCODES];   /* the 15 sorted midpoints, and a 16th slot the search never probes */
    float sorted[QS_NCODES];  /* the levels in ascending order */
    int32_t order[QS_NCODES]; /* code of each sorted level (FP4's permutation; NF4's is the identity) */
} qs_table;

/* bitsandbytes' stored absmax of one block: the raw max |x| of a full block, the 1e-38-clamped one of the tail. */
static inline float block_absmax(const float *x, int64_t len, int tail) {
    uint32_t m = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t u = to_bits(x[i]) & 0x7fffffffu;
        m = u > m ? u : m;
    }
    const float am = from_bits(m);
    return tail && am < 1e-38f ? 1e-38f : am;
}

/* Sums of one candidate: squared error of the reconstruction code[q] * scale, and the two dot products Lloyd's
 * scale step needs. */
typedef struct {
    double err, xc, cc;
} qs_sums;

/* One element, scalar: its code (remapped for FP4) into *q, its level's three sum terms into the lanes. */
QS_INLINE void element(float v, float y, float w, float scale, const qs_table *t, int32_t *q, float *e, float *a,
                       float *b) {
    int32_t k = 0;
    for (int j = 0; j < QS_NBOUNDS; j++) k += !(t->bound[j] >= y);
    const float c = t->sorted[k], d = v - c * scale;
    *q = t->order[k];
    *e += d * d * w;
    *a += v * c * w;
    *b += c * c * w;
}

#if defined(__GNUC__) && !defined(__clang__)
#define QS_VECTOR 1 /* gcc vector extensions: one 16-lane vector per step, a permute per table lookup */
#pragma GCC diagnostic ignored "-Wpsabi" /* vector arguments only between always-inlined functions */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* The bucket count of 16 values at once by binary search over the sorted bounds: four probes, each a 16-entry
 * permute, where a linear count takes fifteen compares. `!(b >= y)` is monotone in the bound index, NaN
 * included, so the count is the linear count exactly. */
QS_INLINE v16i bucket16(v16f y, v16f bounds) {
    v16i k = {0};
    for (int step = 8; step; step >>= 1) {
        const v16f probe = __builtin_shuffle(bounds, k + (step - 1));
        k += ~(probe >= y) & step;
    }
    return k;
}
#endif

/* Codes for x at `assign` (multiplied by its reciprocal for a full block, divided for the tail, as bitsandbytes
 * does), reconstruction at `scale`. Each sum runs in QS_LANES float lanes (element i into lane i % QS_LANES, in
 * order), which vectorizes without reassociating, and the lanes are added in double at the end. */
QS_INLINE qs_sums candidate(const float *x, const float *w, int64_t len, float assign, int tail, float scale,
                            const qs_table *t, int32_t *q) {
    float e[QS_LANES] = {0}, a[QS_LANES] = {0}, b[QS_LANES] = {0};
    const float div = assign < 1e-38f ? 1e-38f : assign, recip = 1.0f / div;
    int64_t c = 0;
#ifdef QS_VECTOR
    if (!tail) {
        v16f ev = {0}, av = {0}, bv = {0}, bounds, sorted;
        v16i order;
        memcpy(&bounds, t->bound, sizeof bounds);
        memcpy(&sorted, t->sorted, sizeof sorted);
        memcpy(&order, t->order, sizeof order);
        for (; c + QS_LANES <= len; c += QS_LANES) {
            v16f v, wv;
            memcpy(&v, x + c, sizeof v);
            memcpy(&wv, w + c, sizeof wv);
            const v16i k = bucket16(v * recip, bounds);
            const v16f lv = __builtin_shuffle(sorted, k), d = v - lv * scale;
            const v16i code = __builtin_shuffle(order, k);
            memcpy(q + c, &code, sizeof code);
            ev += d * d * wv;
            av += v * lv * wv;
            bv += lv * lv * wv;
        }
        memcpy(e, &ev, sizeof e);
        memcpy(a, &av, sizeof a);
        memcpy(b, &bv, sizeof b);
    }
#endif
    for (; c < len; c += QS_LANES) /* the tail block, a blocksize below QS_LANES, or no vector extensions */
        for (int i = 0; i < QS_LANES && c + i < len; i++)
            element(x[c + i], tail ? x[c + i] / div : x[c + i] * recip, w[c + i], scale, t, q + c + i, e + i, a + i,
                    b + i);
    qs_sums s = {0, 0, 0};
    for (int i = 0; i < QS_LANES; i++) {
        s.err += e[i];
        s.xc += a[i];
        s.cc += b[i];
    }
    return s;
}

/* Index of the level nearest `s` among a group's 256 ascending levels (the lower one on a tie). */
static inline int nearest_level(const float *lv, float s) {
    int lo = 0, hi = QS_NLEVELS - 1;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (lv[mid] <= s) lo = mid;
        else hi = mid;
    }
    return s - lv[lo] <= lv[hi] - s ? lo : hi;
}

typedef struct {
    const void *src;
    int dtype;
    int64_t n, bs;
    const qs_table *t;
    const float *absmax;  /* bitsandbytes' absmax per block */
    const float *weight;  /* importance of element i of a row of `cols` (element g of src: weight[g % cols]); NULL: 1 */
    int64_t cols;
    const float *levels;  /* double quant: 256 levels per group of `group` blocks; NULL without */
    int64_t group;
    const float *grid; /* candidate scales as fractions of the raw absmax */
    int ngrid;
    int iters;         /* Lloyd steps from the best grid candidate */
    uint8_t *packed;      /* in: nothing; out: codes */
    float *scale;         /* out: the stored scale per block (the decoded level with double quant) */
    uint8_t *level;       /* double quant: in bitsandbytes' level index per block, out the chosen one */
} qs_job;

/* The best candidate so far: its error, its Lloyd sums, its stored scale and level index; codes in best_q. */
typedef struct {
    qs_sums sums;
    float scale;
    int level;
    int assigned_at_scale; /* codes were assigned at `scale` (not so for bitsandbytes', assigned at the raw max) */
} qs_best;

/* Try stored scale `s` (snapped to its group's level with double quant); keep it if strictly better, and say so. */
QS_INLINE int try_scale(const qs_job *job, const float *x, const float *w, int64_t len, int tail, const float *lv,
                         float s, qs_best *best, int32_t **q, int32_t **best_q) {
    int k = 0;
    if (lv) {
        k = nearest_level(lv, s);
        s = lv[k];
    }
    if (!(s > 0) || (best->assigned_at_scale && s == best->scale)) return 0; /* the same candidate again */
    const qs_sums sums = candidate(x, w, len, s, tail, s, job->t, *q);
    if (!(sums.err < best->sums.err)) return 0;
    *best = (qs_best){sums, s, k, 1};
    int32_t *const won = *q; /* the winner's codes become the best; the old best's buffer takes the next try */
    *q = *best_q;
    *best_q = won;
    return 1;
}

/* The block's elements in fp32, one loop per dtype so each vectorizes. */
QS_INLINE void load_block(const void *src, int dtype, int64_t off, int64_t len, float *x) {
    if (dtype == QS_BF16)
        for (int64_t i = 0; i < len; i++) x[i] = from_bits((uint32_t)((const uint16_t *)src)[off + i] << 16);
    else if (dtype == QS_F16)
        for (int64_t i = 0; i < len; i++) x[i] = f16_to_f32(((const uint16_t *)src)[off + i]);
    else
        memcpy(x, (const float *)src + off, (size_t)len * sizeof *x);
}

/* The block's weights: a view into the row's weights when the block lies inside one row (the usual case), else
 * copied into `buf` across the row ends; `ones` without weights. */
QS_INLINE const float *block_weights(const qs_job *job, int64_t off, int64_t len, float *buf, const float *ones) {
    if (!job->weight) return ones;
    int64_t j = off % job->cols;
    if (j + len <= job->cols) return job->weight + j;
    for (int64_t i = 0; i < len; i++, j = j + 1 == job->cols ? 0 : j + 1) buf[i] = job->weight[j];
    return buf;
}

QS_INLINE void search_block(const qs_job *job, int64_t b, float *x, float *wbuf, const float *ones, int32_t *q,
                            int32_t *best_q) {
    const int64_t off = b * job->bs, len = job->n - off < job->bs ? job->n - off : job->bs;
    const int tail = len < job->bs;
    load_block(job->src, job->dtype, off, len, x);
    const float *w = block_weights(job, off, len, wbuf, ones);
    const float am = job->absmax[b];
    const float *lv = job->levels ? job->levels + (b / job->group) * QS_NLEVELS : NULL;
    qs_best best = {{0, 0, 0}, lv ? lv[job->level[b]] : am, lv ? job->level[b] : 0, 0};
    /* candidate 0: bitsandbytes' result -- codes assigned at the raw absmax, decoded at the stored scale */
    best.sums = candidate(x, w, len, am, tail, best.scale, job->t, best_q);
    for (int j = 0; j < job->ngrid; j++) try_scale(job, x, w, len, tail, lv, am * job->grid[j], &best, &q, &best_q);
    for (int it = 0; it < job->iters && best.sums.cc > 0; it++) {
        const float next = (float)(best.sums.xc / best.sums.cc);
        if (!try_scale(job, x, w, len, tail, lv, next < am ? next : am, &best, &q, &best_q))
            break; /* no gain: the next step would start from the same codes and find the same scale */
    }
    for (int64_t i = 0; i + 1 < len; i += 2) job->packed[(off + i) / 2] = (uint8_t)(best_q[i] << 4 | best_q[i + 1]);
    if (len % 2) job->packed[(off + len - 1) / 2] = (uint8_t)(best_q[len - 1] << 4 | job->t->order[7]);
    job->scale[b] = best.scale;
    if (lv) job->level[b] = (uint8_t)best.level;
}

QS_CLONES
static void search_range(const qs_job *job, int64_t b0, int64_t b1) {
    float x[QS_MAX_BLOCK], wbuf[QS_MAX_BLOCK], ones[QS_MAX_BLOCK];
    int32_t q[QS_MAX_BLOCK], best_q[QS_MAX_BLOCK];
    for (int64_t i = 0; i < job->bs; i++) ones[i] = 1.0f;
    for (int64_t b = b0; b < b1; b++) search_block(job, b, x, wbuf, ones, q, best_q);
}

QS_CLONES
static void absmax_range(const void *src, int dtype, int64_t n, int64_t bs, int64_t b0, int64_t b1, float *out) {
    float x[QS_MAX_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t off = b * bs, len = n - off < bs ? n - off : bs;
        load_block(src, dtype, off, len, x);
        out[b] = block_absmax(x, len, len < bs);
    }
}

static int valid(int dtype, int64_t n, int64_t bs) {
    return (dtype == QS_F32 || dtype == QS_BF16 || dtype == QS_F16) && n >= 0 && bs > 0 && bs % 2 == 0 &&
           bs <= QS_MAX_BLOCK;
}

/* bitsandbytes' stored absmax of each block of n elements of `src` (dtype 0 fp32, 1 bf16, 2 fp16): what double
 * quantization nests before the search starts. Returns 0, or -1 for invalid arguments. */
int qs_absmax(const void *src, int dtype, int64_t n, int64_t blocksize, float *absmax_out, int nthreads) {
    if (!valid(dtype, n, blocksize)) return -1;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel num_threads(workers(n, nblocks, nthreads, QS_MIN_PER_THREAD))
    {
        int64_t b0, b1;
        my_blocks(nblocks, &b0, &b1);
        absmax_range(src, dtype, n, blocksize, b0, b1, absmax_out);
    }
    return 0;
}

/* The search. bounds: the 15 sorted midpoints; order: the code of each sorted level (argsort of `code`); code:
 * the 16 levels in code order; absmax: qs_absmax's result; levels: NULL, or 256 ascending fp32 levels per group
 * of `group` blocks (double quant), with level_io holding bitsandbytes' level index of each block on entry and
 * the chosen one on return; grid: `ngrid` fractions of the raw absmax to try after bitsandbytes' candidate;
 * iters: Lloyd steps from the best of those. Writes ceil(n/2) code bytes and one scale per block. Returns 0 or
 * -1 for invalid arguments. */
int qs_search(const void *src, int dtype, int64_t n, int64_t blocksize, const float *bounds, const uint8_t *order,
              const float *code, const float *absmax, const float *weight, int64_t cols, const float *levels,
              int64_t group, const float *grid, int ngrid, int iters, uint8_t *packed_out, float *scale_out,
              uint8_t *level_io, int nthreads) {
    if (!valid(dtype, n, blocksize) || iters < 0 || ngrid < 0 || (levels && group <= 0) || (weight && cols <= 0))
        return -1;
    qs_table t;
    for (int j = 0; j < QS_NBOUNDS; j++) {
        if (!(bounds[j] >= -1.0f && bounds[j] <= 1.0f) || (j && bounds[j] < bounds[j - 1])) return -1;
        t.bound[j] = bounds[j];
    }
    t.bound[QS_NBOUNDS] = 1.0f;
    for (int j = 0; j < QS_NCODES; j++) {
        if (order[j] >= QS_NCODES) return -1;
        t.order[j] = order[j];
        t.sorted[j] = code[order[j]];
    }
    const qs_job job = {src,   dtype, n,     blocksize,  &t,        absmax,  weight, cols, levels,
                        group, grid,  ngrid, iters,      packed_out, scale_out, level_io};
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel num_threads(workers(n, nblocks, nthreads, QS_MIN_PER_THREAD))
    {
        int64_t b0, b1;
        my_blocks(nblocks, &b0, &b1);
        search_range(&job, b0, b1);
    }
    return 0;
}
