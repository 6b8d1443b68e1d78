// Small-M matmuls for decoding on CPU: y[M, N] = x[M, K] @ W[N, K]^T with few rows (a decode batch), W in bf16, in
// int8 with a bf16 scale per output row, or in fp32. x is rounded to bf16 for bf16 and int8 weights (the products
// then run on AMX tiles or AVX512-BF16 dot products) and stays fp32 for fp32 weights (fp32 fused multiply-adds).
// Decoding is bound by reading W once per step: these kernels stream W in its own layout (the one torch's F.linear
// and _weight_int8pack_mm take, so no second copy) and multiply every loaded piece of it by all M rows of x. The
// callers (cancerllm/gemv.py) check dtypes, shapes and contiguity; these functions trust them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

enum class Weight : int { BF16 = 0, INT8 = 1, F32 = 2 };

struct MatmulArgs {
  const void* x;           // [M, K], Float x_type, contiguous
  Float x_type;
  const void* w;           // [N, K], Weight w_type, contiguous
  Weight w_type;
  const uint16_t* scales;  // [N] bf16 for INT8 weights, else null
  void* y;                 // [M, N], Float y_type, contiguous
  Float y_type;
  bool round_to_bf16;      // results rounded to bf16 even when y is fp32 (the int8 path's contract)
  int64_t M, N, K;
};

// Whether this CPU runs the AVX512-BF16 kernel for bf16 and int8 weights (otherwise the portable one runs; fp32
// weights need AVX512F only).
bool has_avx512_bf16();

// Which kernel runs. Best: for bf16 weights AMX tiles where the CPU has them and Linux grants them (has_amx()),
// else the AVX512 kernels where the CPU has them, else the portable one. The others force a kernel the CPU may
// lack the best one for (tests cover every kernel on one machine): Avx512 never uses AMX, Portable runs everywhere.
// Each kernel sums a row's products in an order that depends on K only, never on M: a row of x gets the same bits
// however many rows share the call (batch-invariant decoding), as long as the same kernel runs.
enum class Kernel : int { Best = 0, Avx512 = 1, Portable = 2 };

// y = x @ W^T (times the row scales), fp32 sums, over `threads` threads (1: the calling thread only).
void small_matmul(const MatmulArgs& args, int threads, Kernel kernel);

}  // namespace cancerllm
