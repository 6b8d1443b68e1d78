// Functions whose loops the compiler vectorizes (`omp simd`) are built for AVX512, AVX2 and baseline x86 and the
// best the CPU runs is picked at load time: the extension is built without -march, so one build runs everywhere.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define CANCERLLM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CANCERLLM_SIMD_CLONES
#endif
