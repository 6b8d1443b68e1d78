// Dropout whose mask is a hash of (seed, element index), for LoRA on CPU: the backward regenerates the mask from
// the seed instead of keeping it, and one pass applies it (torch's CPU dropout draws each value from mt19937, one
// at a time, and keeps the mask and the dropped input of every adapted layer for backward).
// The caller (cancerllm/hashed_dropout.py) checks dtypes, sizes and contiguity; these functions trust them.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace cancerllm {

// Whether element i is kept under `seed`: splitmix64's finalizer of seed + (i + 1) * 2^64 / golden ratio, its top
// 24 bits compared with `threshold` (= round(p * 2^24): kept with probability 1 - threshold / 2^24).
inline bool hashed_keep(uint64_t seed, int64_t i, uint32_t threshold) {
  uint64_t z = seed + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40) >= threshold;
}

// out[i] = kept(i) ? x[i] * scale : 0, in fp32, rounded once to `type`; x and out hold n values of `type` (out may
// be x).
void hashed_dropout(const void* x, void* out, Float type, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                    int threads);

}  // namespace cancerllm
