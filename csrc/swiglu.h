// SwiGLU's elementwise part for training on CPU, forward and backward, one pass each: torch runs the backward as
// ~10 ops with as many full-size fp32 temporaries, each a trip through memory (docs/experiments.md, 2026-11-30).
// The caller (cancerllm/cpu_swiglu.py) checks dtypes, shapes and contiguity; these functions trust them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

// out = silu(gate) * up, in fp32, rounded once to `type`. gate, up, out: n values of `type`.
void swiglu_forward(const void* gate, const void* up, void* out, Float type, int64_t n, int threads);

// With s = sigmoid(gate): grad_up = grad * gate * s, grad_gate = grad * up * (s + gate * s * (1 - s)), in fp32.
// grad_gate and grad_up may be gate's and up's own memory (the inputs are read before either is written).
void swiglu_backward(const void* grad, const void* gate, const void* up, void* grad_gate, void* grad_up, Float type,
                     int64_t n, int threads);

}  // namespace cancerllm
