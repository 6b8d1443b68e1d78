// bf16 <-> fp32 for the decoding kernels, as torch converts: widening is exact, narrowing rounds to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

namespace cancerllm {

enum class Float : int { F32 = 0, BF16 = 1 };  // activation element types the decoding kernels take

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // NaN stays a (quiet) NaN; a select, not a branch: loops vectorize
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t nan = (bits >> 16) | 0x40u, rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t is_nan = (bits & 0x7fffffffu) > 0x7f800000u;   // 0 or 1: masks below, no control flow
  return static_cast<uint16_t>((rounded & (is_nan - 1u)) | (nan & (0u - is_nan)));
}

// Element i of an activation tensor of type t, as fp32; and v stored there (rounded for bf16).
inline float load_float(const void* p, Float t, int64_t i) {
  return t == Float::BF16 ? bf16_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store_float(void* p, Float t, int64_t i, float v) {
  if (t == Float::BF16) {
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// The same for loops instantiated per element type (uint16_t holding bf16, or float), so that the compiler
// vectorizes each: widen to fp32, and narrow back (rounding to nearest even for bf16).
template <typename T>
inline float widen(T v) {
  if constexpr (sizeof(T) == 2) return bf16_to_float(v);
  else return v;
}

template <typename T>
inline T narrow(float v) {
  if constexpr (sizeof(T) == 2) return float_to_bf16(v);
  else return v;
}

// v as type t holds it: rounded through bf16 for BF16, unchanged for F32.
inline float round_to(Float t, float v) { return t == Float::BF16 ? bf16_to_float(float_to_bf16(v)) : v; }

}  // namespace cancerllm
