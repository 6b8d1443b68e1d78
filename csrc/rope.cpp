// Rotary embedding (rope.h): one token's heads at a time through an fp32 buffer (chunks.h), so each loop vectorizes.
#include "rope.h"

#include <vector>

#include "chunks.h"
#include "simd.h"

namespace cancerllm {
namespace {

constexpr int64_t kParallelValues = int64_t{1} << 15;   // below this, one thread: a fork costs more than it saves

// head: dim values in fp32, rotated in place; c, s: the token's dim / 2 angles' cosines and sines.
CANCERLLM_SIMD_CLONES void rotate_head(float* head, const float* c, const float* s, float sign, int64_t half) {
  float* x1 = head;
  float* x2 = head + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x1[i], b = x2[i];
    x1[i] = a * c[i] - sign * b * s[i];
    x2[i] = b * c[i] + sign * a * s[i];
  }
}

template <typename T>
void rotate_typed(const void* x, const float* cos, const float* sin, void* out, float sign, int64_t tokens,
                  int64_t heads, int64_t dim, int threads) {
  const T* in = static_cast<const T*>(x);
  T* result = static_cast<T*>(out);
  const int64_t half = dim / 2, width = heads * dim;
  const bool parallel = threads > 1 && tokens > 1 && tokens * width >= kParallelValues;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> buffer(width);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      widen_chunk(in + t * width, buffer.data(), width);
      for (int64_t h = 0; h < heads; ++h) {
        rotate_head(buffer.data() + h * dim, cos + t * half, sin + t * half, sign, half);
      }
      narrow_chunk(buffer.data(), result + t * width, width);
    }
  }
}

}  // namespace

void rope_rotate(const void* x, const float* cos, const float* sin, void* out, float sign, Float type, int64_t tokens,
                 int64_t heads, int64_t dim, int threads) {
  if (type == Float::BF16) rotate_typed<uint16_t>(x, cos, sin, out, sign, tokens, heads, dim, threads);
  else rotate_typed<float>(x, cos, sin, out, sign, tokens, heads, dim, threads);
}

}  // namespace cancerllm
