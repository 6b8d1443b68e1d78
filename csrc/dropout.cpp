// Hashed dropout (dropout.h): blocks of values split over threads, each block one vectorized loop.
#include "dropout.h"

#include <algorithm>

#include "chunks.h"

namespace cancerllm {
namespace {

constexpr int64_t kBlock = 4096;
constexpr int64_t kParallelValues = int64_t{1} << 15;

CANCERLLM_SIMD_CLONES_INT64 void mask_chunk(float* v, int64_t first, int64_t n, uint64_t seed, uint32_t threshold,
                                            float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = hashed_keep(seed, first + i, threshold) ? v[i] * scale : 0.0f;
}

template <typename T>
void dropout_block(const T* x, T* out, int64_t first, int64_t n, uint64_t seed, uint32_t threshold, float scale) {
  float v[kChunk];
  for (int64_t at = 0; at < n; at += kChunk) {
    const int64_t count = std::min(kChunk, n - at);
    widen_chunk(x + at, v, count);
    mask_chunk(v, first + at, count, seed, threshold, scale);
    narrow_chunk(v, out + at, count);
  }
}

template <typename T>
void dropout_typed(const void* x, void* out, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                   int threads) {
  const T* in = static_cast<const T*>(x);
  T* o = static_cast<T*>(out);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n >= kParallelValues)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t at = b * kBlock;
    dropout_block<T>(in + at, o + at, at, std::min(kBlock, n - at), seed, threshold, scale);
  }
}

}  // namespace

void hashed_dropout(const void* x, void* out, Float type, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                    int threads) {
  if (type == Float::BF16) dropout_typed<uint16_t>(x, out, n, seed, threshold, scale, threads);
  else dropout_typed<float>(x, out, n, seed, threshold, scale, threads);
}

}  // namespace cancerllm
