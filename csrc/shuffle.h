// The per-epoch shuffle: a bijection of [0, n) keyed by (seed, epoch), computed per index in O(1) time and memory.
// Twin of cancerllm.data.loader.Permutation; both must give the same order.
#pragma once

#include <cstdint>

namespace cancerllm {

// splitmix64's finaliser: a bijective 64-bit hash.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A 4-round Feistel network over the smallest even-bit power of two >= n, cycle-walked back into [0, n):
// the domain is under 4n, so a lookup takes fewer than 4 walks on average.
class Permutation {
 public:
  Permutation(uint64_t n, uint64_t seed, uint64_t epoch) : n_(n) {
    unsigned bits = n > 1 ? 64 - __builtin_clzll(n - 1) : 0;
    half_bits_ = bits > 1 ? (bits + 1) / 2 : 1;
    half_mask_ = (uint64_t{1} << half_bits_) - 1;
    uint64_t key = mix64(mix64(seed) ^ epoch);
    for (uint64_t r = 0; r < kRounds; ++r) keys_[r] = mix64(key + r);
  }

  uint64_t operator()(uint64_t i) const {
    uint64_t x = i;
    do {
      uint64_t left = x >> half_bits_, right = x & half_mask_;
      for (uint64_t k : keys_) {
        uint64_t next = left ^ (mix64(right ^ k) & half_mask_);
        left = right;
        right = next;
      }
      x = (left << half_bits_) | right;
    } while (x >= n_);
    return x;
  }

 private:
  static constexpr int kRounds = 4;
  uint64_t n_;
  unsigned half_bits_;
  uint64_t half_mask_;
  uint64_t keys_[kRounds];
};

}  // namespace cancerllm
