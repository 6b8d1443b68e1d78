// RMSNorm over the rows of an activation tensor: y = x / sqrt(mean(x^2) + eps) * weight, in fp32 whatever x holds,
// y rounded to x's type.
// For decoding (rms_norm_rows): one call where torch runs a norm as several ops (a conversion to fp32, the norm, a
// conversion back), whose fixed costs dominate at a decode step's one row of a few hundred values.
// For training (rms_norm_forward / rms_norm_backward, with the residual addition fused in): one pass over the rows
// each way, where torch's ops made ~9 ms of passes over fp32 temporaries per SmolLM2 norm of 2 x 1,024 tokens.
// The callers (cancerllm/decode_rms_norm.py, cancerllm/cpu_rms_norm.py) check dtypes, shapes and contiguity; these
// functions trust them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

// x, y: [rows, dim] of `type` (y may be x); weight: [dim] fp32. Rows split over `threads` OpenMP threads when
// there are enough of them.
void rms_norm_rows(const void* x, const float* weight, float eps, void* y, Float type, int64_t rows, int64_t dim,
                   int threads);

// Training forward: h = x + residual (rounded to `type`: the stream the caller carries on) when residual is not
// null, else h is x; rstd[row] = 1 / sqrt(mean(h^2) + eps); y = h * rstd * weight, all in fp32, rounded once on
// store. x, residual, y, h: [rows, dim] of `type` (h unused without residual); weight: [dim] fp32; rstd: [rows] fp32.
void rms_norm_forward(const void* x, const void* residual, const float* weight, float eps, void* y, void* h,
                      float* rstd, Float type, int64_t rows, int64_t dim, int threads);

// Training backward from the saved h and rstd: with xhat = h * rstd,
//   grad_in = rstd * (grad_y * weight - xhat * mean(grad_y * weight * xhat)) (+ grad_h when not null),
//   grad_weight = sum over rows of grad_y * xhat (skipped when grad_weight is null),
// in fp32; grad_in rounded once to `type`. Each thread sums its own rows' share of grad_weight, then the shares
// are added in thread order: the same thread count gives the same bits.
void rms_norm_backward(const void* grad_y, const void* grad_h, const void* h, const float* weight, const float* rstd,
                       void* grad_in, float* grad_weight, Float type, int64_t rows, int64_t dim, int threads);

}  // namespace cancerllm
