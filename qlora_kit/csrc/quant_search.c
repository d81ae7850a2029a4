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
 * Errors and dot products are summed in a fixed order (16 float lanes, then a pairwise tree in double across the
 * lanes) that the torch fallback (qlora_kit/quant_search.py) repeats operation for operation, so the two choose the
 * same bits. The same IEEE rules as quant4.c apply: no -ffast-math, no FMA contraction. The element helpers below
 * repeat quant4.c's (that file belongs to the plain kernels); tests pin them by checking that the first candidate
 * is bitsandbytes' result bit for bit.
 */
#include <stdint.h>
#include <string.h>

#include "clones.h"
#include "fpbits.h"
#include "parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Inlined into each clone, so the hot loops are compiled for every instruction set the clones target. */
#define QS_INLINE static inline __attribute__((always_inline))

enum { QS_F32 = 0, QS_BF16 = 1, QS_F16 = 2 };
enum { QS_NBOUNDS = 15, QS_NCODES = 16, QS_NLEVELS = 256 };
enum { QS_LANES = 16, QS_MAX_BLOCK = 4096, QS_CHUNK = 16 }; /* QS_CHUNK: blocks searched side by side */
enum { QS_MIN_PER_THREAD = 1 << 16 }; /* several bucket passes per element: worth a thread sooner than quant4.c */

enum { QS_CELLS = 32 };   /* the bucket lookup's cells over [-1, 1] */
#define QS_CELL_TOP 0.999f /* y is clamped to [-1, QS_CELL_TOP] before the lookup: exact while every bound is below */
#define QS_CELL_SLACK 1e-5f /* far above the rounding of y * 16 + 16 (2^-23 in y), far below the bounds' spacing */

typedef struct {
    float bound[QS_NCODES];   /* the 15 sorted midpoints, and a 16th slot the search never probes */
    float sorted[QS_NCODES];  /* the levels in ascending order */
    int32_t order[QS_NCODES]; /* code of each sorted level (FP4's permutation; NF4's is the identity) */
    int cells;                /* the cell lookup below holds for these bounds (NF4's; FP4's are too close) */
    int32_t cell_base[QS_CELLS]; /* bounds below cell c (with slack): the bucket of its lowest y */
    float cell_bound[QS_CELLS];  /* the one bound within cell c (with slack), or 2 (above every clamped y) */
} qs_table;

/* The cell lookup: the bucket of y is cell_base[c] + (cell_bound[c] < y) for y's cell c = trunc(y * 16 + 16),
 * when no cell (widened by the slack on both sides, which covers the rounding of the cell index) holds more than
 * one bound. Two table permutes and one compare where a binary search over the bounds chains four of each -- the
 * chain that bounded the search's speed. Returns whether the lookup holds (it falls back to the search if not). */
static int build_cells(qs_table *t) {
    if (!(t->bound[QS_NBOUNDS - 1] < QS_CELL_TOP - QS_CELL_SLACK)) return 0;
    for (int c = 0; c < QS_CELLS; c++) {
        const float lo = -1.0f + (float)c / 16 - QS_CELL_SLACK, hi = -1.0f + (float)(c + 1) / 16 + QS_CELL_SLACK;
        int below = 0, inside = 0;
        t->cell_bound[c] = 2.0f;
        for (int j = 0; j < QS_NBOUNDS; j++) {
            below += t->bound[j] < lo;
            if (t->bound[j] >= lo && t->bound[j] <= hi) {
                inside++;
                t->cell_bound[c] = t->bound[j];
            }
        }
        if (inside > 1) return 0;
        t->cell_base[c] = below;
    }
    return 1;
}

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

/* The 16 float lanes of a sum, added in double as a fixed pairwise tree (lane i with lane i + 8, then i with i + 4,
 * and so on): the same association as the torch path's, and four dependent adds where a running sum takes
 * sixteen -- with blocks of 64, this reduction was a third of each candidate's cost. */
QS_INLINE double lane_total(const float *lane) {
    double t[QS_LANES / 2];
    for (int i = 0; i < QS_LANES / 2; i++) t[i] = (double)lane[i] + (double)lane[i + QS_LANES / 2];
    for (int w = QS_LANES / 4; w; w /= 2)
        for (int i = 0; i < w; i++) t[i] = t[i] + t[i + w];
    return t[0];
}

/* One element i, scalar: its code (remapped for FP4) into its nibble of the packed codes q (high for even i), its
 * level's three sum terms into the lanes. */
QS_INLINE void element(float v, float y, float w, float scale, const qs_table *t, int64_t i, uint8_t *q, float *e,
                       float *a, float *b) {
    int32_t k = 0;
    for (int j = 0; j < QS_NBOUNDS; j++) k += !(t->bound[j] >= y);
    const float c = t->sorted[k], d = v - c * scale;
    if (i % 2) q[i / 2] |= (uint8_t)t->order[k];
    else q[i / 2] = (uint8_t)(t->order[k] << 4);
    *e += d * d * w;
    *a += v * c * w;
    *b += c * c * w;
}

#if defined(__GNUC__) && !defined(__clang__)
#define QS_VECTOR 1 /* gcc vector extensions: one 16-lane vector per step, a permute per table lookup */
#pragma GCC diagnostic ignored "-Wpsabi" /* vector arguments only between always-inlined functions */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint64_t v8u64 __attribute__((vector_size(64)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));
typedef double v8d __attribute__((vector_size(64)));
typedef double v4d __attribute__((vector_size(32)));
typedef double v2d __attribute__((vector_size(16)));

/* Eight code bytes from sixteen codes: each 64-bit lane holds a pair (the first in its low half), so the byte is
 * (lane << 4 | lane >> 32) narrowed -- shifts and one vpmovqb, no cross-lane permutes. */
QS_INLINE v8u8 pack16(v16i code) {
    const v8u64 pair = (v8u64)code;
    return __builtin_convertvector(pair << 4 | pair >> 32, v8u8);
}

/* lane_total on a vector, in the same order (lane i + lane i + 8, then i + i + 4, ...). */
QS_INLINE double lane_total16(v16f lane) {
    const v8d t8 = __builtin_convertvector(__builtin_shufflevector(lane, lane, 0, 1, 2, 3, 4, 5, 6, 7), v8d) +
                   __builtin_convertvector(__builtin_shufflevector(lane, lane, 8, 9, 10, 11, 12, 13, 14, 15), v8d);
    const v4d t4 = __builtin_shufflevector(t8, t8, 0, 1, 2, 3) + __builtin_shufflevector(t8, t8, 4, 5, 6, 7);
    const v2d t2 = __builtin_shufflevector(t4, t4, 0, 1) + __builtin_shufflevector(t4, t4, 2, 3);
    return t2[0] + t2[1];
}

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

/* The bucket count of 16 values by the cell lookup (build_cells); the same count as bucket16 for any y, NaN
 * included: the upper clamp sends a NaN to QS_CELL_TOP, above every bound, as `!(b >= NaN)` counts all. */
QS_INLINE v16i bucket16_cells(v16f y, const v16i base[2], const v16f bound[2]) {
    const v16f top = {QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP,
                      QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP, QS_CELL_TOP,
                      QS_CELL_TOP, QS_CELL_TOP};
    const v16f bottom = top * 0.0f - 1.0f;
    v16i below = (v16i)(y < top);
    y = (v16f)(((v16i)y & below) | ((v16i)top & ~below));
    below = (v16i)(y > bottom);
    y = (v16f)(((v16i)y & below) | ((v16i)bottom & ~below));
    const v16i cell = __builtin_convertvector(y * 16.0f + 16.0f, v16i);
    return __builtin_shuffle(base[0], base[1], cell) - (__builtin_shuffle(bound[0], bound[1], cell) < y);
}
#endif

#ifdef QS_VECTOR
/* A full block's candidate, 16 lanes per step (len a multiple of 16): `cells` picks the bucket lookup, `dots`
 * whether the two Lloyd sums are wanted (the last candidate tried needs only its error). Both are constants at
 * each call, so each combination compiles to its own loop. */
QS_INLINE qs_sums vector_candidate(const float *x, const float *w, int64_t len, float recip, float scale,
                                   const qs_table *t, uint8_t *q, const int cells, const int dots) {
    v16f ev = {0}, av = {0}, bv = {0}, bounds, sorted, cell_bound[2];
    v16i order, cell_base[2];
    memcpy(&bounds, t->bound, sizeof bounds);
    memcpy(&sorted, t->sorted, sizeof sorted);
    memcpy(&order, t->order, sizeof order);
    memcpy(cell_base, t->cell_base, sizeof cell_base);
    memcpy(cell_bound, t->cell_bound, sizeof cell_bound);
    for (int64_t c = 0; c < len; c += QS_LANES) {
        v16f v, wv;
        memcpy(&v, x + c, sizeof v);
        memcpy(&wv, w + c, sizeof wv);
        const v16i k = cells ? bucket16_cells(v * recip, cell_base, cell_bound) : bucket16(v * recip, bounds);
        const v16f lv = __builtin_shuffle(sorted, k), d = v - lv * scale;
        const v8u8 code = pack16(__builtin_shuffle(order, k));
        memcpy(q + c / 2, &code, sizeof code);
        ev += d * d * wv;
        if (dots) {
            av += v * lv * wv;
            bv += lv * lv * wv;
        }
    }
    return (qs_sums){lane_total16(ev), dots ? lane_total16(av) : 0, dots ? lane_total16(bv) : 0};
}
#endif

/* Codes for x at `assign` (multiplied by its reciprocal for a full block, divided for the tail, as bitsandbytes
 * does), packed two per byte into q, reconstruction at `scale`. Each sum runs in QS_LANES float lanes (element i
 * into lane i % QS_LANES, in order), which vectorizes without reassociating, and the lanes are added in double at
 * the end. Without `dots` the Lloyd sums may be left 0. */
QS_INLINE qs_sums candidate(const float *x, const float *w, int64_t len, float assign, int tail, float scale,
                            const qs_table *t, uint8_t *q, int dots) {
    float e[QS_LANES] = {0}, a[QS_LANES] = {0}, b[QS_LANES] = {0};
    const float div = assign < 1e-38f ? 1e-38f : assign, recip = 1.0f / div;
#ifdef QS_VECTOR
    if (!tail && len % QS_LANES == 0) {
        if (t->cells)
            return dots ? vector_candidate(x, w, len, recip, scale, t, q, 1, 1)
                        : vector_candidate(x, w, len, recip, scale, t, q, 1, 0);
        return dots ? vector_candidate(x, w, len, recip, scale, t, q, 0, 1)
                    : vector_candidate(x, w, len, recip, scale, t, q, 0, 0);
    }
#endif
    for (int64_t c = 0; c < len; c += QS_LANES) /* the tail block, a blocksize below 16, or no vector extensions */
        for (int i = 0; i < QS_LANES && c + i < len; i++)
            element(x[c + i], tail ? x[c + i] / div : x[c + i] * recip, w[c + i], scale, t, c + i, q, e + i, a + i,
                    b + i);
    return (qs_sums){lane_total(e), lane_total(a), lane_total(b)};
}

/* Index of the level nearest `s` among a group's 256 ascending levels (the lower one on a tie): lo is the last
 * level <= s (0 if none, a NaN included), kept within [0, 254] so that hi = lo + 1 exists. The bisection is
 * branchless (its branches were unpredictable), and a chunk's blocks overlap their chains of loads. */
QS_INLINE int nearest_level(const float *lv, float s) {
    int lo = 0;
    for (int half = QS_NLEVELS / 2; half; half /= 2) lo = lv[lo + half] <= s ? lo + half : lo;
    lo = lo < QS_NLEVELS - 2 ? lo : QS_NLEVELS - 2;
    const int hi = lo + 1;
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

/* One block's search in progress: its data, its best candidate, and the buffer its next try writes codes into. */
typedef struct {
    const float *x, *w, *lv;
    int64_t off, len;
    int tail, live, next_k;
    float am, next; /* the next candidate scale, snapped, and its level */
    qs_best best;
    uint8_t *q, *best_q;
} qs_block;

/* Block b's data and its candidate 0: bitsandbytes' result -- codes assigned at the raw absmax, decoded at the
 * stored scale (the level bitsandbytes chose, with double quant). */
QS_INLINE void start_block(const qs_job *job, int64_t b, float *x, float *wbuf, const float *ones, uint8_t *q,
                           uint8_t *best_q, qs_block *st) {
    st->off = b * job->bs;
    st->len = job->n - st->off < job->bs ? job->n - st->off : job->bs;
    st->tail = st->len < job->bs;
    load_block(job->src, job->dtype, st->off, st->len, x);
    st->x = x;
    st->w = block_weights(job, st->off, st->len, wbuf, ones);
    st->am = job->absmax[b];
    st->lv = job->levels ? job->levels + (b / job->group) * QS_NLEVELS : NULL;
    st->best = (qs_best){{0, 0, 0}, st->lv ? st->lv[job->level[b]] : st->am, st->lv ? job->level[b] : 0, 0};
    st->best.sums = candidate(x, st->w, st->len, st->am, st->tail, st->best.scale, job->t, best_q, job->iters > 0);
    st->q = q;
    st->best_q = best_q;
    st->live = 1;
}

/* The block's next candidate scale: s, snapped to its group's nearest level with double quant. */
QS_INLINE void next_scale(qs_block *st, float s) {
    st->next_k = st->lv ? nearest_level(st->lv, s) : 0;
    st->next = st->lv ? st->lv[st->next_k] : s;
}

/* Try the block's next scale (next_scale's); keep it if strictly better, and say so. `dots`: whether a later
 * Lloyd step will want the sums of <x, c> and <c, c> should this one win. */
QS_INLINE int try_block(const qs_job *job, qs_block *st, int dots) {
    const float s = st->next;
    if (!(s > 0) || (st->best.assigned_at_scale && s == st->best.scale)) return 0; /* the same candidate again */
    const qs_sums sums = candidate(st->x, st->w, st->len, s, st->tail, s, job->t, st->q, dots);
    if (!(sums.err < st->best.sums.err)) return 0;
    st->best = (qs_best){sums, s, st->next_k, 1};
    uint8_t *const won = st->q; /* the winner's codes become the best; the old best's buffer takes the next try */
    st->q = st->best_q;
    st->best_q = won;
    return 1;
}

QS_INLINE void finish_block(const qs_job *job, int64_t b, qs_block *st) {
    if (st->len % 2) st->best_q[st->len / 2] |= (uint8_t)job->t->order[7]; /* an odd tail pads with 0.0's code */
    memcpy(job->packed + st->off / 2, st->best_q, (size_t)(st->len + 1) / 2);
    job->scale[b] = st->best.scale;
    if (st->lv) job->level[b] = (uint8_t)st->best.level;
}

/* Blocks b0..b0+count-1, each step across all of them before the next, and each step's scales (a division and
 * a level snap: a chain of dependent loads) for all of them before any candidate: one block at a time, that
 * chain's latency was paid in full per block, a third of the search with double quant at blocksize 64. The
 * choices are the block-at-a-time ones: a block leaves the Lloyd steps at its first step without gain. */
QS_INLINE void search_chunk(const qs_job *job, int64_t b0, int count, float *x, float *wbuf, const float *ones,
                            uint8_t *q, uint8_t *best_q) {
    qs_block st[QS_CHUNK];
    const int64_t bs = job->bs, half = bs / 2;
    for (int g = 0; g < count; g++)
        start_block(job, b0 + g, x + g * bs, wbuf + g * bs, ones, q + g * half, best_q + g * half, st + g);
    for (int j = 0; j < job->ngrid; j++) {
        for (int g = 0; g < count; g++) next_scale(st + g, st[g].am * job->grid[j]);
        for (int g = 0; g < count; g++) try_block(job, st + g, job->iters > 0);
    }
    for (int it = 0, live = count; it < job->iters && live; it++) {
        for (int g = 0; g < count; g++) {
            qs_block *const b = st + g;
            b->live = b->live && b->best.sums.cc > 0;
            const float next = b->live ? (float)(b->best.sums.xc / b->best.sums.cc) : 0;
            if (b->live) next_scale(b, next < b->am ? next : b->am);
        }
        live = 0;
        for (int g = 0; g < count; g++) {
            /* no gain: the next step would start from the same codes and find the same scale */
            if (st[g].live) st[g].live = try_block(job, st + g, it + 1 < job->iters);
            live += st[g].live;
        }
    }
    for (int g = 0; g < count; g++) finish_block(job, b0 + g, st + g);
}

KERNEL_CLONES
static void search_range(const qs_job *job, int64_t b0, int64_t b1) {
    float x[QS_MAX_BLOCK], wbuf[QS_MAX_BLOCK], ones[QS_MAX_BLOCK];
    uint8_t q[QS_MAX_BLOCK / 2], best_q[QS_MAX_BLOCK / 2];
    const int64_t per = QS_MAX_BLOCK / job->bs;
    const int chunk = per < QS_CHUNK ? (int)per : QS_CHUNK;
    for (int64_t i = 0; i < job->bs; i++) ones[i] = 1.0f;
    for (int64_t b = b0; b < b1; b += chunk)
        search_chunk(job, b, b1 - b < chunk ? (int)(b1 - b) : chunk, x, wbuf, ones, q, best_q);
}

KERNEL_CLONES
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
    t.cells = build_cells(&t);
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
