/* How the kernels split work over OpenMP threads (quant4.c, quant_search.c, gemv4.c, gemv16.c share it). */
#ifndef QLORA_KIT_PARALLEL_H
#define QLORA_KIT_PARALLEL_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Threads worth waking for n elements in nblocks blocks: one per `min_per_thread` elements at most. Below that the
 * wake-up and the join cost more than they save -- on a busy machine a join can wait a whole scheduler slice. */
static inline int workers(int64_t n, int64_t nblocks, int nthreads, int64_t min_per_thread) {
    int64_t w = n / min_per_thread;
    w = w < nblocks ? w : nblocks;
    w = w < nthreads ? w : nthreads;
    return w < 1 ? 1 : (int)w;
}

/* This thread's contiguous range of blocks, so each thread streams through its own slice of memory. */
static inline void my_blocks(int64_t nblocks, int64_t *b0, int64_t *b1) {
    int64_t w = 0, nw = 1;
#ifdef _OPENMP
    w = omp_get_thread_num();
    nw = omp_get_num_threads();
#endif
    const int64_t per = nblocks / nw, extra = nblocks % nw;
    *b0 = w * per + (w < extra ? w : extra);
    *b1 = *b0 + per + (w < extra);
}

#endif
