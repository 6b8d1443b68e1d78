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

// Attention's backward from the scores to their gradient in one pass over blocks of rows: for each block of 16 (AMX)
// or 8 rows, S = Q K^T and dP = dO V^T into fp32 buffers of the thread (score_matmul's tiles, causal columns only),
// then each row's softmax backward (attention_softmax_backward_row) writes P and dS = P (dP - delta) scale in bf16.
// The same values as score_matmul twice and attention_softmax_backward, without the [M, N] fp32 S and dP making a
// round trip through memory. Causal; rows position-major, `group` query heads per key/value head (M = N * group).
struct AttentionBackwardArgs {
  const uint16_t* q;          // [heads, M, K] bf16, score_matmul's A
  const uint16_t* k;          // [heads, N, K] bf16
  const uint16_t* grad_out;   // [heads, M, K] bf16, dO in q's row order
  const uint16_t* v;          // [heads, N, K] bf16
  const float* lse;           // [heads * M], the forward's natural-log log-sum-exp of the scaled scores
  const float* delta;         // [heads * M], sum_d dO O
  uint16_t* probs;            // [heads, M, N] bf16 out, 0 where not visible
  uint16_t* grad_scores;      // [heads, M, N] bf16 out, 0 where not visible
  int64_t heads, M, N, K;     // K even
  int64_t group, window;      // window 0: none
  float scale;
  bool allow_amx;
};

void attention_backward_scores(const AttentionBackwardArgs& args, int threads);

}  // namespace cancerllm
