// Functions whose loops the compiler vectorizes (`omp simd`) are built for AVX512, AVX2 and baseline x86 and the
// best the CPU runs is picked at load time: the extension is built without -march, so one build runs everywhere.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define CANCERLLM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// Loops of 64-bit integer multiplies (the dropout hash): AVX512F alone has no 64-bit vector multiply and emulates
// it in three; x86-64-v4 (AVX512DQ's vpmullq) ran the hash 2.2x faster. A clone of its own, so that the float
// kernels keep the instruction set, and the roundings, they were tested with.
#define CANCERLLM_SIMD_CLONES_INT64 __attribute__((target_clones("arch=x86-64-v4", "avx512f", "avx2", "default")))
#else
#define CANCERLLM_SIMD_CLONES
#define CANCERLLM_SIMD_CLONES_INT64
#endif
