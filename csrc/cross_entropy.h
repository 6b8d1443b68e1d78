// Cross-entropy over rows of logits for the fused linear cross-entropy on CPU (cancerllm/cpu_linear_cross_entropy.py):
// the output head's matmuls run in the logits' dtype at the machine's matmul rate, and this pass turns each row of
// logits into its loss and its gradient in one read, with fp32 arithmetic, rounding once on store.
// The caller checks dtypes, shapes and contiguity; these functions trust them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

// For each of the `rows` rows of logits [rows, V] (of `type`): loss[r] = logsumexp(logits[r]) - logits[r, target[r]]
// (fp32; target in [0, V)), and logits[r] overwritten with row_scale[r] * (softmax(logits[r]) - onehot(target[r])),
// the gradient of row_scale[r] * loss[r]. A row with row_scale 0 becomes zeros (its loss is still written).
void cross_entropy_rows(void* logits, Float type, const int64_t* target, const float* row_scale, float* loss,
                        int64_t rows, int64_t V, int threads);

}  // namespace cancerllm
