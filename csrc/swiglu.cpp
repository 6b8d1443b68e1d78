// SwiGLU forward and backward (swiglu.h): blocks of values split over threads, each block one vectorized loop.
#include "swiglu.h"

#include <algorithm>

#include "chunks.h"
#include "fast_exp.h"

namespace cancerllm {
namespace {

constexpr int64_t kBlock = 4096;                         // values per thread's turn: 8-16 KB of each input
constexpr int64_t kParallelValues = int64_t{1} << 15;   // below this, one thread: a fork costs more than it saves

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

CANCERLLM_SIMD_CLONES void forward_floats(const float* g, float* u_out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u_out[i] = g[i] * sigmoid(g[i]) * u_out[i];
}

// d_gu: grad in, grad_up out; g: gate in, grad_gate out; u: up in.
CANCERLLM_SIMD_CLONES void backward_floats(float* d_gu, float* g, const float* u, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]), silu = g[i] * s, d = d_gu[i];
    d_gu[i] = d * silu;
    g[i] = d * u[i] * (s + silu * (1.0f - s));
  }
}

template <typename T>
void forward_block(const T* gate, const T* up, T* out, int64_t n) {
  float g[kChunk], u[kChunk];
  for (int64_t at = 0; at < n; at += kChunk) {
    const int64_t count = std::min(kChunk, n - at);
    widen_chunk(gate + at, g, count);
    widen_chunk(up + at, u, count);
    forward_floats(g, u, count);
    narrow_chunk(u, out + at, count);
  }
}

template <typename T>
void backward_block(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, int64_t n) {
  float d[kChunk], g[kChunk], u[kChunk];
  for (int64_t at = 0; at < n; at += kChunk) {
    const int64_t count = std::min(kChunk, n - at);
    widen_chunk(grad + at, d, count);
    widen_chunk(gate + at, g, count);
    widen_chunk(up + at, u, count);
    backward_floats(d, g, u, count);
    narrow_chunk(d, grad_up + at, count);
    narrow_chunk(g, grad_gate + at, count);
  }
}

// fn(offset, count) over [0, n) in blocks, on `threads` threads when n is large enough.
template <typename Fn>
void over_blocks(int64_t n, int threads, Fn fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n >= kParallelValues)
  for (int64_t b = 0; b < blocks; ++b) fn(b * kBlock, std::min(kBlock, n - b * kBlock));
}

template <typename T>
void forward_typed(const void* gate, const void* up, void* out, int64_t n, int threads) {
  const T *g = static_cast<const T*>(gate), *u = static_cast<const T*>(up);
  T* o = static_cast<T*>(out);
  over_blocks(n, threads, [&](int64_t at, int64_t count) { forward_block(g + at, u + at, o + at, count); });
}

template <typename T>
void backward_typed(const void* grad, const void* gate, const void* up, void* grad_gate, void* grad_up, int64_t n,
                    int threads) {
  const T *d = static_cast<const T*>(grad), *g = static_cast<const T*>(gate), *u = static_cast<const T*>(up);
  T *dg = static_cast<T*>(grad_gate), *du = static_cast<T*>(grad_up);
  over_blocks(n, threads, [&](int64_t at, int64_t count) {
    backward_block(d + at, g + at, u + at, dg + at, du + at, count);
  });
}

}  // namespace

void swiglu_forward(const void* gate, const void* up, void* out, Float type, int64_t n, int threads) {
  if (type == Float::BF16) forward_typed<uint16_t>(gate, up, out, n, threads);
  else forward_typed<float>(gate, up, out, n, threads);
}

void swiglu_backward(const void* grad, const void* gate, const void* up, void* grad_gate, void* grad_up, Float type,
                     int64_t n, int threads) {
  if (type == Float::BF16) backward_typed<uint16_t>(grad, gate, up, grad_gate, grad_up, n, threads);
  else backward_typed<float>(grad, gate, up, grad_gate, grad_up, n, threads);
}

}  // namespace cancerllm
