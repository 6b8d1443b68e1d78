// A decode step's block in one call (decode_layer.h).
#include "decode_layer.h"

#include <cmath>
#include <vector>

#include "rms_norm.h"

namespace cancerllm {
namespace {

// y [M, w.N] = x [M, w.K] @ w^T, in the activations' type (int8 weights' results rounded to bf16, as
// gemv.Multiplier asks for them).
void matmul(const void* x, const LinearWeights& w, void* y, Float type, int64_t M, int threads, bool portable) {
  MatmulArgs args{x, type, w.w, w.type, w.scales, y, type, w.scales != nullptr, M, w.N, w.K};
  small_matmul(args, threads, portable);
}

// out[i] = a[i] + b[i], each rounded to `type` (torch's add of two tensors of that type).
void add(const void* a, const void* b, void* out, Float type, int64_t count) {
  for (int64_t i = 0; i < count; ++i) store_float(out, type, i, load_float(a, type, i) + load_float(b, type, i));
}

// up[i] = up[i] * silu(gate[i]), where silu's result is rounded to `type` first (F.silu, then mul_).
void swiglu(const void* gate, void* up, Float type, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float g = load_float(gate, type, i);
    const float activated = round_to(type, g / (1.0f + std::exp(-g)));
    store_float(up, type, i, load_float(up, type, i) * activated);
  }
}

}  // namespace

void decode_layer(const DecodeLayerArgs& a, int threads, bool portable) {
  const DecodeAttentionArgs& at = a.attention;
  const Float type = at.type;
  const int64_t n = at.n, element = type == Float::BF16 ? 2 : 4;
  // Scratch in the activations' type: the normed input, the q/k/v projection, the attention output, the gate and
  // the up projection.
  std::vector<char> normed(n * a.dim * element), qkv(n * a.qkv.N * element), attended(n * at.Hq * at.D * element),
      gate(n * a.hidden * element), up(n * a.hidden * element), projected(n * a.dim * element);

  rms_norm_rows(a.x, a.input_norm, a.eps, normed.data(), type, n, a.dim, threads);
  matmul(normed.data(), a.qkv, qkv.data(), type, n, threads, portable);
  DecodeAttentionArgs attention = at;
  attention.qkv = qkv.data();
  attention.out = attended.data();
  decode_attention(attention, threads, portable);
  matmul(attended.data(), a.o, projected.data(), type, n, threads, portable);
  add(projected.data(), a.x, a.out, type, n * a.dim);                       // h = x + o(attention)

  rms_norm_rows(a.out, a.post_norm, a.eps, normed.data(), type, n, a.dim, threads);
  matmul(normed.data(), a.gate, gate.data(), type, n, threads, portable);
  matmul(normed.data(), a.up, up.data(), type, n, threads, portable);
  swiglu(gate.data(), up.data(), type, n * a.hidden);
  matmul(up.data(), a.down, projected.data(), type, n, threads, portable);
  add(projected.data(), a.out, a.out, type, n * a.dim);                     // out = h + down(swiglu)
}

}  // namespace cancerllm
