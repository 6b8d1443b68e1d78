// The softmax of causal (optionally sliding-window) attention for training on CPU, forward and backward, over fp32
// scores (cancerllm/cpu_attention.py): the matmuls around it run at the machine's matmul rate, and these passes do
// the masking, exponentials and rounding in one read of each score row.
// The caller checks dtypes, shapes and contiguity; these functions trust them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

// Rows of scores [rows, L], fp32, row r the query at position t = (r / group) % L (queries of one key/value head
// position-major, `group` query heads per position). Key j is visible to it when j <= t and, with window > 0,
// t - j < window; only the visible entries of a row are read. Scores are scaled by `scale` before the softmax.
struct SoftmaxRows {
  int64_t rows, L, group, window;
  float scale;
};

// probs[r, j] = softmax over the visible j of scale * scores[r, j], 0 elsewhere, rounded once to `type`;
// lse[r] = the natural-log log-sum-exp of the visible scaled scores.
void attention_softmax_forward(const SoftmaxRows& shape, const float* scores, void* probs, Float type, float* lse,
                               int threads);

// From the scores again, their lse, dP = dO V^T (fp32) and delta[r] = sum_d dO[r, d] O[r, d]: probs as the
// forward's and grad_scores = probs * (dP - delta) * scale (the gradient of the unscaled scores), both rounded once
// to `type`, 0 where j is not visible.
void attention_softmax_backward(const SoftmaxRows& shape, const float* scores, const float* lse,
                                const float* grad_probs, const float* delta, void* probs, void* grad_scores,
                                Float type, int threads);

// Row r of attention_softmax_backward in bf16, its scores and dP rows given on their own (rows of a tile's buffers,
// only the visible entries read); p and g are fp32 scratch of L floats each. For attention_backward_scores.
void attention_softmax_backward_row(const SoftmaxRows& shape, int64_t r, const float* scores_row,
                                    const float* grad_probs_row, float lse, float delta, uint16_t* probs_row,
                                    uint16_t* grad_row, float* p, float* g);

}  // namespace cancerllm
