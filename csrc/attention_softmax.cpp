// Causal attention softmax, forward and backward (attention_softmax.h): rows split over threads, each row's visible
// span one vectorized loop per step into an fp32 buffer, then narrowed to the output type.
#include "attention_softmax.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "chunks.h"
#include "fast_exp.h"

namespace cancerllm {
namespace {

constexpr int64_t kParallelValues = int64_t{1} << 15;

// The visible keys [first, last) of row r.
void visible(const SoftmaxRows& shape, int64_t r, int64_t* first, int64_t* last) {
  const int64_t t = (r / shape.group) % shape.L;
  *last = t + 1;
  *first = shape.window > 0 ? std::max<int64_t>(0, t - shape.window + 1) : 0;
}

CANCERLLM_SIMD_CLONES float scaled_max(const float* s, int64_t n, float scale) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j] * scale);
  return m;
}

// out[j] = e^(scale * s[j] - shift); returns their sum.
CANCERLLM_SIMD_CLONES float exp_shifted(const float* s, float* out, int64_t n, float scale, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    out[j] = fast_exp(s[j] * scale - shift);
    sum += out[j];
  }
  return sum;
}

// g[j] = p[j] * (dp[j] - delta) * scale.
CANCERLLM_SIMD_CLONES void softmax_grad(const float* p, const float* dp, float* g, int64_t n, float delta,
                                        float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = p[j] * (dp[j] - delta) * scale;
}

// A row's fp32 buffer, its visible [first, last) rounded into the output row and zeros around it (written as bytes:
// rounding the masked half of a causal row was a third of the fused backward's time).
template <typename T>
void store_row(const float* buffer, int64_t first, int64_t last, int64_t L, T* out) {
  std::memset(out, 0, first * sizeof(T));
  for (int64_t at = first; at < last; at += kChunk) narrow_chunk(buffer + at, out + at, std::min(kChunk, last - at));
  std::memset(out + last, 0, (L - last) * sizeof(T));
}

template <typename T>
void forward_typed(const SoftmaxRows& shape, const float* scores, T* probs, float* lse, int threads) {
  const int64_t L = shape.L;
  const bool parallel = threads > 1 && shape.rows * L >= kParallelValues;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> buffer(L);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < shape.rows; ++r) {
      int64_t first, last;
      visible(shape, r, &first, &last);
      const float* s = scores + r * L + first;
      const float m = scaled_max(s, last - first, shape.scale);
      const float sum = exp_shifted(s, buffer.data() + first, last - first, shape.scale, m);
      times(buffer.data() + first, last - first, 1.0f / sum);
      lse[r] = m + std::log(sum);
      store_row(buffer.data(), first, last, L, probs + r * L);
    }
  }
}

// Row r of the backward from its scores and dP rows (only [first, last) read); p and g are L-float buffers.
template <typename T>
void backward_row(const SoftmaxRows& shape, int64_t r, const float* scores_row, const float* grad_probs_row,
                  float lse, float delta, T* probs_row, T* grad_row, float* p, float* g) {
  int64_t first, last;
  visible(shape, r, &first, &last);
  const int64_t n = last - first;
  exp_shifted(scores_row + first, p + first, n, shape.scale, lse);
  softmax_grad(p + first, grad_probs_row + first, g + first, n, delta, shape.scale);
  store_row(p, first, last, shape.L, probs_row);
  store_row(g, first, last, shape.L, grad_row);
}

template <typename T>
void backward_typed(const SoftmaxRows& shape, const float* scores, const float* lse, const float* grad_probs,
                    const float* delta, T* probs, T* grad_scores, int threads) {
  const int64_t L = shape.L;
  const bool parallel = threads > 1 && shape.rows * L >= kParallelValues;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> p(L), g(L);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < shape.rows; ++r)
      backward_row(shape, r, scores + r * L, grad_probs + r * L, lse[r], delta[r], probs + r * L,
                   grad_scores + r * L, p.data(), g.data());
  }
}

}  // namespace

void attention_softmax_forward(const SoftmaxRows& shape, const float* scores, void* probs, Float type, float* lse,
                               int threads) {
  if (type == Float::BF16) forward_typed(shape, scores, static_cast<uint16_t*>(probs), lse, threads);
  else forward_typed(shape, scores, static_cast<float*>(probs), lse, threads);
}

void attention_softmax_backward(const SoftmaxRows& shape, const float* scores, const float* lse,
                                const float* grad_probs, const float* delta, void* probs, void* grad_scores,
                                Float type, int threads) {
  if (type == Float::BF16) {
    backward_typed(shape, scores, lse, grad_probs, delta, static_cast<uint16_t*>(probs),
                   static_cast<uint16_t*>(grad_scores), threads);
  } else {
    backward_typed(shape, scores, lse, grad_probs, delta, static_cast<float*>(probs),
                   static_cast<float*>(grad_scores), threads);
  }
}

void attention_softmax_backward_row(const SoftmaxRows& shape, int64_t r, const float* scores_row,
                                    const float* grad_probs_row, float lse, float delta, uint16_t* probs_row,
                                    uint16_t* grad_row, float* p, float* g) {
  backward_row(shape, r, scores_row, grad_probs_row, lse, delta, probs_row, grad_row, p, g);
}

}  // namespace cancerllm
