/* KERNEL_CLONES: compile a hot function for AVX-512, AVX2, SSE4 and baseline x86-64 and pick one at load time
 * (target_clones rather than -march=native, so a wheel runs anywhere). quant4.c, quant_search.c and xent.c
 * share it. The x86-64-vN names exist from GCC 11 on; setup.py also probes the compiler and defines
 * Q4_NO_CLONES when it rejects them (an older gcc, a cross compiler). Without clones the kernels are built for
 * the baseline only: the same bits, slower. */
#ifndef QLORA_KIT_CLONES_H
#define QLORA_KIT_CLONES_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 11 \
    && !defined(Q4_NO_CLONES)
#define KERNEL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "arch=x86-64-v2", "default")))
#else
#define KERNEL_CLONES
#endif

#endif
