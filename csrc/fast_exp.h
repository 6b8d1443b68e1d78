// e^x in fp32 for the decoding kernels' loops: branch-free, so that a loop of them vectorizes (std::exp does not;
// a decode step takes ~1e5 for the softmaxes and as many for SwiGLU).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace cancerllm {

// e^x within 2 ulp for x in [-87, 88]: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, 2^n in the
// exponent bits. Below -87 (e^x < 2^-126) the result is 0, above 88 it is e^88.
inline float fast_exp(float x) {
  const bool underflow = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float kRound = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof n_bits);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;   // ln2 in two parts: r stays exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const int32_t scale_bits = ((n_bits - 0x4B400000) + 127) << 23;   // 2^n, n = the integer kRound held
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return underflow ? 0.0f : e_r * scale;
}

}  // namespace cancerllm
