// Attention's score matmuls for training on CPU: C[M, N] = A[M, K] @ B[N, K]^T per head, A and B bf16, C fp32 (bf16
// products are exact in fp32 and summed there, as a GPU's flash attention keeps its scores). torch's CPU matmuls
// either round their output to bf16 (too coarse for softmax logits) or run in fp32 at half the rate; our small-M
// decoding kernel ends each output in a horizontal sum, slow at a head's 64-wide rows. Here a tile of 8 rows x 32
// columns accumulates in 16 registers over pairs of K (`vdpbf16ps` on B repacked by pairs), or, where the CPU has
// AMX and Linux grants it, 16 rows x 32 columns in two tile registers (`tdpbf16ps`, the same products summed in fp32
// in another order). AVX512-BF16 at least: the caller (cancerllm/cpu_attention.py) checks has_avx512_bf16(),
// dtypes, shapes and contiguity.
#pragma once

#include <cstdint>

#include "amx.h"   // has_amx()

namespace cancerllm {

struct ScoreMatmulArgs {
  const uint16_t* a;   // [heads, M, K] bf16
  const uint16_t* b;   // [heads, N, K] bf16
  float* c;            // [heads, M, N] fp32
  int64_t heads, M, N, K;   // K even
  // causal_group > 0: row r is the query at position r / causal_group and only columns up to it are computed
  // (the others are left unwritten); 0: every column.
  int64_t causal_group;
  bool allow_amx;   // false: the AVX512-BF16 tiles even where AMX runs (for tests of both)
};

void score_matmul(const ScoreMatmulArgs& args, int threads);

}  // namespace cancerllm
