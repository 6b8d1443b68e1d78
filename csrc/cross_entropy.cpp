// Cross-entropy rows (cross_entropy.h): rows split over threads; each row widened once into an fp32 buffer (a 49k
// vocabulary is 192 KB, within L2), reduced there, and narrowed back in place as its gradient.
#include "cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "chunks.h"
#include "fast_exp.h"

namespace cancerllm {
namespace {

constexpr int64_t kParallelValues = int64_t{1} << 15;

CANCERLLM_SIMD_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = e^(x[j] - shift); returns their sum.
CANCERLLM_SIMD_CLONES float exp_in_place(float* x, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = fast_exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

template <typename T>
void rows_typed(T* logits, const int64_t* target, const float* row_scale, float* loss, int64_t rows, int64_t V,
                int threads) {
  const bool parallel = threads > 1 && rows > 1 && rows * V >= kParallelValues;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> buffer(V);
    float* x = buffer.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      T* row = logits + r * V;
      for (int64_t at = 0; at < V; at += kChunk) widen_chunk(row + at, x + at, std::min(kChunk, V - at));
      const float target_logit = x[target[r]], m = row_max(x, V);
      const float sum = exp_in_place(x, V, m);
      loss[r] = m + std::log(sum) - target_logit;
      // x / sum is the softmax; scaled by the row's weight in the loss, less that weight at the target.
      const float scale = row_scale[r];
      times(x, V, scale / sum);
      x[target[r]] -= scale;
      for (int64_t at = 0; at < V; at += kChunk) narrow_chunk(x + at, row + at, std::min(kChunk, V - at));
    }
  }
}

}  // namespace

void cross_entropy_rows(void* logits, Float type, const int64_t* target, const float* row_scale, float* loss,
                        int64_t rows, int64_t V, int threads) {
  if (type == Float::BF16) rows_typed(static_cast<uint16_t*>(logits), target, row_scale, loss, rows, V, threads);
  else rows_typed(static_cast<float*>(logits), target, row_scale, loss, rows, V, threads);
}

}  // namespace cancerllm
