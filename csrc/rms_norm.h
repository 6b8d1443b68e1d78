// RMSNorm over the rows of an activation tensor, for decoding: y = x / sqrt(mean(x^2) + eps) * weight, in fp32
// whatever x holds, y rounded to x's type. One call where torch runs a norm as several ops (a conversion to fp32,
// the norm, a conversion back), whose fixed costs dominate at a decode step's one row of a few hundred values.
// The caller (cancerllm/decode_rms_norm.py) checks dtypes, shapes and contiguity; this function trusts them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

// x, y: [rows, dim] of `type` (y may be x); weight: [dim] fp32. Rows split over `threads` OpenMP threads when
// there are enough of them.
void rms_norm_rows(const void* x, const float* weight, float eps, void* y, Float type, int64_t rows, int64_t dim,
                   int threads);

}  // namespace cancerllm
