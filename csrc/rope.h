// Rotary embedding for training on CPU (Hugging Face's half layout): each head's halves (x1, x2) rotated by
// sign * angle, (x1 cos - sign x2 sin, x2 cos + sign x1 sin), in fp32, rounded once to the activations' type.
// sign = 1 is the forward, -1 its backward (the inverse rotation of the incoming gradient). One pass where torch
// runs a widening, four products and a narrowing, each over the whole tensor (docs/experiments.md, 2026-12-01).
// The caller (cancerllm/cpu_rope.py) checks dtypes, shapes and contiguity; this function trusts them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

// x, out: [tokens, heads, dim] of `type` (out may be x); cos, sin: [tokens, dim / 2] fp32, dim even.
void rope_rotate(const void* x, const float* cos, const float* sin, void* out, float sign, Float type, int64_t tokens,
                 int64_t heads, int64_t dim, int threads);

}  // namespace cancerllm
