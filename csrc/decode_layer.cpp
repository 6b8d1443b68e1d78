// A decode step's block in one call (decode_layer.h).
#include "decode_layer.h"

#include <algorithm>
#include <vector>

#include "fast_exp.h"
#include "rms_norm.h"
#include "simd.h"

namespace cancerllm {
namespace {

// y [M, w.N] = x [M, w.K] @ w^T, in the activations' type (int8 weights' results rounded to bf16, as
// gemv.Multiplier asks for them).
void matmul(const void* x, const LinearWeights& w, void* y, Float type, int64_t M, int threads, Kernel kernel) {
  MatmulArgs args{x, type, w.w, w.type, w.scales, y, type, w.scales != nullptr, M, w.N, w.K};
  small_matmul(args, threads, kernel);
}

// Elementwise loops over n values of one activation type, widened to fp32 and rounded back on store (bf16.h's
// widen / narrow), vectorized by the compiler (`omp simd`, cloned per instruction set).
// out[i] = a[i] + b[i] (torch's add of two tensors of that type).
template <typename T>
CANCERLLM_SIMD_CLONES void add_typed(const T* a, const T* b, T* out, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = narrow<T>(widen(a[i]) + widen(b[i]));
}

// silu(g) in fp32 for `count` values.
CANCERLLM_SIMD_CLONES void silu_floats(const float* gate, float* out, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = gate[i] / (1.0f + fast_exp(-gate[i]));
}

// up[i] = up[i] * silu(gate[i]), silu's result rounded to the type first (F.silu, then mul_): in chunks through
// fp32 buffers, each loop simple enough for the compiler to vectorize.
template <typename T>
CANCERLLM_SIMD_CLONES void swiglu_typed(const T* gate, T* up, int64_t count) {
  constexpr int64_t kChunk = 256;
  float g[kChunk], silu[kChunk];
  for (int64_t at = 0; at < count; at += kChunk) {
    const int64_t n = std::min(kChunk, count - at);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) g[i] = widen(gate[at + i]);
    silu_floats(g, silu, n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) up[at + i] = narrow<T>(widen(up[at + i]) * widen(narrow<T>(silu[i])));
  }
}

void add(const void* a, const void* b, void* out, Float type, int64_t count) {
  if (type == Float::BF16) {
    add_typed(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), static_cast<uint16_t*>(out), count);
  } else {
    add_typed(static_cast<const float*>(a), static_cast<const float*>(b), static_cast<float*>(out), count);
  }
}

void swiglu(const void* gate, void* up, Float type, int64_t count) {
  if (type == Float::BF16) {
    swiglu_typed(static_cast<const uint16_t*>(gate), static_cast<uint16_t*>(up), count);
  } else {
    swiglu_typed(static_cast<const float*>(gate), static_cast<float*>(up), count);
  }
}

}  // namespace

void decode_layer(const DecodeLayerArgs& a, int threads, Kernel kernel) {
  const DecodeAttentionArgs& at = a.attention;
  const Float type = at.type;
  const int64_t n = at.n, element = type == Float::BF16 ? 2 : 4;
  // Scratch in the activations' type: the normed input, the q/k/v projection, the attention output, the gate and
  // up projections, and the o or down projection before its residual is added.
  std::vector<char> normed(n * a.dim * element), qkv(n * a.qkv.N * element), attended(n * at.Hq * at.D * element),
      gate(n * a.hidden * element), up(n * a.hidden * element), projected(n * a.dim * element);

  rms_norm_rows(a.x, a.input_norm, a.eps, normed.data(), type, n, a.dim, threads);
  matmul(normed.data(), a.qkv, qkv.data(), type, n, threads, kernel);
  DecodeAttentionArgs attention = at;
  attention.qkv = qkv.data();
  attention.out = attended.data();
  decode_attention(attention, threads, kernel == Kernel::Portable);
  matmul(attended.data(), a.o, projected.data(), type, n, threads, kernel);
  add(projected.data(), a.x, a.out, type, n * a.dim);                       // h = x + o(attention)

  rms_norm_rows(a.out, a.post_norm, a.eps, normed.data(), type, n, a.dim, threads);
  matmul(normed.data(), a.gate, gate.data(), type, n, threads, kernel);
  matmul(normed.data(), a.up, up.data(), type, n, threads, kernel);
  swiglu(gate.data(), up.data(), type, n * a.hidden);
  matmul(up.data(), a.down, projected.data(), type, n, threads, kernel);
  add(projected.data(), a.out, a.out, type, n * a.dim);                     // out = h + down(swiglu)
}

}  // namespace cancerllm
