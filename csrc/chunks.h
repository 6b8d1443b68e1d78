// The training kernels' elementwise loops (swiglu.cpp, dropout.cpp, attention_softmax.cpp, cross_entropy.cpp,
// rms_norm.cpp, rope.cpp) go through fp32 buffers (of kChunk values, or of one row): a loop that widens or narrows
// bf16 and also computes does not vectorize (GCC 12), each of these simple ones does.
#pragma once

#include <cstdint>

#include "bf16.h"
#include "simd.h"

namespace cancerllm {
namespace {  // internal linkage: each kernel file gets its own clones of these

constexpr int64_t kChunk = 256;

template <typename T>
CANCERLLM_SIMD_CLONES void widen_chunk(const T* in, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = widen(in[i]);
}

template <typename T>
CANCERLLM_SIMD_CLONES void narrow_chunk(const float* in, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = narrow<T>(in[i]);
}

// v[j] *= factor over an fp32 buffer (a softmax's normalisation).
CANCERLLM_SIMD_CLONES void times(float* v, int64_t n, float factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) v[j] *= factor;
}

}  // namespace
}  // namespace cancerllm
