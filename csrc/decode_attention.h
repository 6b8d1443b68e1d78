// One decoding step's attention for every row of a batch, over its KV cache, in one call: the new token's query
// and key heads rotated (RoPE, Hugging Face's half layout), its key and value stored in the cache slot its
// position maps to, then each query head attends over the slots its row may see. What cancerllm/cache.py does in
// a dozen torch ops per layer (rotation, two index_put, SDPA on a mask), whose fixed costs dominate at one token.
// The caller (cancerllm/decode_attention.py) checks dtypes, shapes and contiguity; this function trusts them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

struct DecodeAttentionArgs {
  const void* qkv;           // [n, Hq + 2 Hkv, D]: the fused q/k/v projection of each row's new token, `type`
  const float* cos;          // [n, D / 2]: each row's rotary angles at its position
  const float* sin;
  void* k_cache;             // [n, Hkv, S, D] each, `type`: the rows' caches, written at slot position % S
  void* v_cache;
  const int64_t* slot_pos;   // [n, S]: the position each slot holds (-1: empty), the new token's included
  const int64_t* positions;  // [n]: each row's new position
  void* out;                 // [n, Hq, D], `type`
  Float type;
  int64_t n, Hq, Hkv, S, D;
  int64_t window;            // a key at position j is seen from position i when i - window < j <= i; 0: no window
  float scale;               // on q.k before the softmax, 1 / sqrt(D) in Mistral and Llama
};

// Rows and KV heads split over `threads` OpenMP threads (torch's runtime) when there is enough work. `portable`
// runs the portable loops on any CPU (tests cover both on a CPU that has AVX512).
void decode_attention(const DecodeAttentionArgs& args, int threads, bool portable);

// Whether this CPU runs the AVX512 loops.
bool has_avx512();

}  // namespace cancerllm
