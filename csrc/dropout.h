// Dropout whose mask is a hash of (seed, element index), for LoRA on CPU: the backward regenerates the mask from
// the seed instead of keeping it, and one pass applies it (torch's CPU dropout draws each value from mt19937, one
// at a time, and keeps the mask and the dropped input of every adapted layer for backward).
// The caller (cancerllm/hashed_dropout.py) checks dtypes, sizes and contiguity; these functions trust them.
#pragma once

#include <cstdint>

namespace cancerllm {

// The hash's key for elements [2^32 k, 2^32 (k + 1)): the seed's two halves and k mixed into 32 bits, so that the
// per-element hash works on 32-bit lanes (16 to a vector, on cheap 32-bit multiplies) for any tensor size.
inline uint32_t hashed_key(uint64_t seed, int64_t first) {
  const uint32_t high = static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(static_cast<uint64_t>(first) >> 32);
  return static_cast<uint32_t>(seed) + high * 0x27D4EB2Fu;
}

// The per-element hash's multipliers (dropout.cpp's vector loop uses them too).
constexpr uint32_t kHashGolden = 0x9E3779B9u, kHashMix1 = 0x85EBCA6Bu, kHashMix2 = 0xC2B2AE35u;

// Whether element i (its low 32 bits; the key carries the rest) is kept: murmur3's finalizer of (i + 1) * 2^32 /
// golden ratio xor key, its top 24 bits compared with `threshold` (= round(p * 2^24): kept with probability
// 1 - threshold / 2^24).
inline bool hashed_keep(uint32_t key, uint32_t i, uint32_t threshold) {
  uint32_t h = (i + 1u) * kHashGolden ^ key;
  h = (h ^ (h >> 16)) * kHashMix1;
  h = (h ^ (h >> 13)) * kHashMix2;
  h ^= h >> 16;
  return (h >> 8) >= threshold;
}

// out[i] = kept(i) ? x[i] : 0 on n elements of `bytes` (2 or 4) each, copied bit for bit: the 1 / (1 - p) that
// dropout scales the kept ones by is the caller's to fold into a product it makes anyway (out may be x).
// allow_avx512 = false runs the portable loop on any CPU (tests compare the two).
void hashed_dropout(const void* x, void* out, int bytes, int64_t n, uint64_t seed, uint32_t threshold, int threads,
                    bool allow_avx512);

}  // namespace cancerllm
