// One transformer block of a decode step in one call: the ops of model.FusedBlock.forward at one token per row,
// composed from the decoding kernels (rms_norm.h, gemv.h, decode_attention.h) with the residual additions and
// SwiGLU between them, so that the ~12 calls a block makes from Python cost one. Every intermediate is rounded to
// the activations' type exactly where the op-by-op path rounds it, so both paths compute the same values.
// The caller (cancerllm/decode_layer.py) checks every tensor; this function trusts what it is given.
#pragma once

#include <cstdint>

#include "decode_attention.h"
#include "gemv.h"

namespace cancerllm {

struct LinearWeights {  // one matmul's weight [N, K] as small_matmul reads it
  const void* w;
  Weight type;
  const uint16_t* scales;  // bf16 [N] for INT8 weights, else null
  int64_t N, K;
};

struct DecodeLayerArgs {
  const void* x;              // [n, dim]: the block's input (the residual stream), `attention.type`
  void* out;                  // [n, dim]: the block's output
  const float* input_norm;    // [dim] each, fp32
  const float* post_norm;
  float eps;
  LinearWeights qkv, o, gate, up, down;
  DecodeAttentionArgs attention;  // its qkv and out are scratch this call provides; the rest as for decode_attention
  int64_t dim, hidden;
};

// `kernel` picks the matmuls' kernel (gemv.h); Portable also runs the attention's portable loops.
void decode_layer(const DecodeLayerArgs& args, int threads, Kernel kernel);

}  // namespace cancerllm
