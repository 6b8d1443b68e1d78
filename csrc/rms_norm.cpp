// RMSNorm rows (rms_norm.h): each row widened to fp32 once, its mean square summed in vector lanes.
#include "rms_norm.h"

#include <cmath>
#include <vector>

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

}  // namespace

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
