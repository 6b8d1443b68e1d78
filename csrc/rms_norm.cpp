// RMSNorm rows (rms_norm.h): each row widened to fp32 once, its mean square summed in vector lanes. The training
// pair works on whole rows in fp32 buffers, each loop simple enough to vectorize (chunks.h).
#include "rms_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "chunks.h"
#include "simd.h"

namespace cancerllm {
namespace {

constexpr int64_t kParallelValues = int64_t{1} << 16;   // below this many values one thread does all rows

CANCERLLM_SIMD_CLONES void norm_row(const void* x, const float* weight, float eps, void* y, Float type,
                                      int64_t row, int64_t dim, float* buffer) {
  const int64_t at = row * dim;
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t d = 0; d < dim; ++d) {
    buffer[d] = load_float(x, type, at + d);
    squares += buffer[d] * buffer[d];
  }
  const float inverse_rms = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
  if (type == Float::F32) {
    float* out = static_cast<float*>(y) + at;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] = buffer[d] * inverse_rms * weight[d];
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(y) + at;
  for (int64_t d = 0; d < dim; ++d) out[d] = float_to_bf16(buffer[d] * inverse_rms * weight[d]);
}

CANCERLLM_SIMD_CLONES void add_into(float* a, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

CANCERLLM_SIMD_CLONES float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

CANCERLLM_SIMD_CLONES void scale(float* a, float s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] *= s;
}

CANCERLLM_SIMD_CLONES void scale_by_weight(float* a, float s, const float* weight, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] * s * weight[i];
}

CANCERLLM_SIMD_CLONES void accumulate_product(float* sum, const float* a, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) sum[i] += a[i] * b[i];
}

// xhat becomes rstd * (gw - xhat * mean), gw = grad_y * weight: the gradient through the normalisation.
CANCERLLM_SIMD_CLONES void project(float* xhat, const float* gw, float rstd, float mean, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) xhat[i] = rstd * (gw[i] - xhat[i] * mean);
}

template <typename T>
void forward_row(const T* x, const T* residual, const float* weight, float eps, T* y, T* h, float* rstd, int64_t dim,
                 float* a, float* b) {
  widen_chunk(x, a, dim);
  if (residual != nullptr) {
    widen_chunk(residual, b, dim);
    add_into(a, b, dim);
    narrow_chunk(a, h, dim);
    widen_chunk(h, a, dim);   // normalise the stream as stored, as the reference does
  }
  *rstd = 1.0f / std::sqrt(dot(a, a, dim) / static_cast<float>(dim) + eps);
  scale_by_weight(a, *rstd, weight, dim);
  narrow_chunk(a, y, dim);
}

template <typename T>
void backward_row(const T* grad_y, const T* grad_h, const T* h, const float* weight, float rstd, T* grad_in,
                  float* grad_weight, int64_t dim, float* a, float* b) {
  widen_chunk(h, a, dim);
  scale(a, rstd, dim);                                          // a = xhat
  widen_chunk(grad_y, b, dim);
  if (grad_weight != nullptr) accumulate_product(grad_weight, a, b, dim);
  scale_by_weight(b, 1.0f, weight, dim);                        // b = grad_y * weight
  project(a, b, rstd, dot(a, b, dim) / static_cast<float>(dim), dim);
  if (grad_h != nullptr) {
    widen_chunk(grad_h, b, dim);
    add_into(a, b, dim);
  }
  narrow_chunk(a, grad_in, dim);
}

// fn(part, first row, end row) over `parts` contiguous row ranges, one per thread.
template <typename Fn>
void over_parts(int64_t rows, int parts, Fn fn) {
#pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
  for (int part = 0; part < parts; ++part) fn(part, rows * part / parts, rows * (part + 1) / parts);
}

int parts_for(int64_t rows, int64_t dim, int threads) {
  return threads > 1 && rows > 1 && rows * dim >= kParallelValues ? static_cast<int>(std::min<int64_t>(threads, rows))
                                                                  : 1;
}

template <typename T>
void forward_typed(const void* x, const void* residual, const float* weight, float eps, void* y, void* h, float* rstd,
                   int64_t rows, int64_t dim, int threads) {
  const T *xs = static_cast<const T*>(x), *rs = static_cast<const T*>(residual);
  T *ys = static_cast<T*>(y), *hs = static_cast<T*>(h);
  over_parts(rows, parts_for(rows, dim, threads), [&](int, int64_t begin, int64_t end) {
    std::vector<float> a(dim), b(dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t at = row * dim;
      forward_row(xs + at, rs == nullptr ? nullptr : rs + at, weight, eps, ys + at, hs == nullptr ? nullptr : hs + at,
                  rstd + row, dim, a.data(), b.data());
    }
  });
}

template <typename T>
void backward_typed(const void* grad_y, const void* grad_h, const void* h, const float* weight, const float* rstd,
                    void* grad_in, float* grad_weight, int64_t rows, int64_t dim, int threads) {
  const T *gy = static_cast<const T*>(grad_y), *gh = static_cast<const T*>(grad_h), *hs = static_cast<const T*>(h);
  T* gi = static_cast<T*>(grad_in);
  const int parts = parts_for(rows, dim, threads);
  std::vector<float> shares(grad_weight == nullptr ? 0 : parts * dim, 0.0f);
  over_parts(rows, parts, [&](int part, int64_t begin, int64_t end) {
    std::vector<float> a(dim), b(dim);
    float* share = grad_weight == nullptr ? nullptr : shares.data() + part * dim;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t at = row * dim;
      backward_row(gy + at, gh == nullptr ? nullptr : gh + at, hs + at, weight, rstd[row], gi + at, share, dim,
                   a.data(), b.data());
    }
  });
  if (grad_weight == nullptr) return;
  std::copy(shares.begin(), shares.begin() + dim, grad_weight);
  for (int part = 1; part < parts; ++part) add_into(grad_weight, shares.data() + part * dim, dim);
}

}  // namespace

void rms_norm_forward(const void* x, const void* residual, const float* weight, float eps, void* y, void* h,
                      float* rstd, Float type, int64_t rows, int64_t dim, int threads) {
  if (type == Float::BF16) forward_typed<uint16_t>(x, residual, weight, eps, y, h, rstd, rows, dim, threads);
  else forward_typed<float>(x, residual, weight, eps, y, h, rstd, rows, dim, threads);
}

void rms_norm_backward(const void* grad_y, const void* grad_h, const void* h, const float* weight, const float* rstd,
                       void* grad_in, float* grad_weight, Float type, int64_t rows, int64_t dim, int threads) {
  if (type == Float::BF16) {
    backward_typed<uint16_t>(grad_y, grad_h, h, weight, rstd, grad_in, grad_weight, rows, dim, threads);
  } else {
    backward_typed<float>(grad_y, grad_h, h, weight, rstd, grad_in, grad_weight, rows, dim, threads);
  }
}

void rms_norm_rows(const void* x, const float* weight, float eps, void* y, Float type, int64_t rows, int64_t dim,
                   int threads) {
  const bool parallel = threads > 1 && rows > 1 && rows * dim >= kParallelValues;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> buffer(dim);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) norm_row(x, weight, eps, y, type, row, dim, buffer.data());
  }
}

}  // namespace cancerllm
