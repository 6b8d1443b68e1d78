// What the AVX512 kernels (gemv.cpp, decode_attention.cpp, score_matmul.cpp) share: target attributes, lane
// reductions and the run-time check.
// The intrinsics are x86 with GCC or Clang only: the includers guard their AVX512 code with CANCERLLM_X86.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX512 headers warn about their own _mm512_undefined_* placeholders (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define CANCERLLM_X86 1
#define CANCERLLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define CANCERLLM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

namespace cancerllm {

// The lane sums of a, b, c and d, as 4 floats: one transposing reduction instead of four (at short K the
// reductions are a good part of a tile's work).
CANCERLLM_AVX512 inline __m128 sum_lanes4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128 bits: a b a b
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // per 128 bits: a b c d
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// The sum of v's 16 lanes, added in sum_lanes4's order: a dot product comes to the same bits whichever of the two
// reduces it, so a kernel that reduces four at a time where it can and one at a time for the rest (gemv.cpp,
// decode_attention.cpp) gives a row the same result however many rows share the call (batch-invariant decoding).
CANCERLLM_AVX512 inline float sum_lanes(__m512 v) { return _mm_cvtss_f32(sum_lanes4(v, v, v, v)); }

}  // namespace cancerllm
#endif  // x86

namespace cancerllm {

// Whether this CPU runs the AVX512 (F, BW, DQ, VL) loops; false off x86.
inline bool cpu_has_avx512() {
#ifdef CANCERLLM_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

}  // namespace cancerllm
