// Hashed dropout (dropout.h): blocks of elements split over threads; on AVX512 each block hashes 16 indices per
// vector and copies the kept words through the comparison's mask (a select on 16-bit words needs AVX512BW, which
// GCC's avx512f clones lack: the compiler left the bf16 loop scalar, 2.5x slower than the old 64-bit hash).
#include "dropout.h"

#include <algorithm>

#include "avx512.h"

namespace cancerllm {
namespace {

constexpr int64_t kBlock = 4096;  // divides 2^32: a block never straddles two keys
constexpr int64_t kParallelValues = int64_t{1} << 15;

template <typename Word>
void mask_block_scalar(const Word* x, Word* out, int64_t n, uint32_t key, uint32_t low, uint32_t threshold) {
  for (int64_t i = 0; i < n; ++i) out[i] = hashed_keep(key, low + static_cast<uint32_t>(i), threshold) ? x[i] : 0;
}

#ifdef CANCERLLM_X86
// hashed_keep for the 16 indices in `index`, as a lane mask.
CANCERLLM_AVX512 inline __mmask16 keep16(__m512i index, __m512i key, __m512i threshold) {
  const __m512i golden = _mm512_set1_epi32(static_cast<int>(kHashGolden));
  const __m512i mix1 = _mm512_set1_epi32(static_cast<int>(kHashMix1));
  const __m512i mix2 = _mm512_set1_epi32(static_cast<int>(kHashMix2));
  __m512i h = _mm512_xor_si512(_mm512_mullo_epi32(_mm512_add_epi32(index, _mm512_set1_epi32(1)), golden), key);
  h = _mm512_mullo_epi32(_mm512_xor_si512(h, _mm512_srli_epi32(h, 16)), mix1);
  h = _mm512_mullo_epi32(_mm512_xor_si512(h, _mm512_srli_epi32(h, 13)), mix2);
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  return _mm512_cmpge_epu32_mask(_mm512_srli_epi32(h, 8), threshold);
}

// Words 16 at a time (4-byte) or 32 at a time (2-byte, two hash vectors); the tail through a partial mask.
template <typename Word>
CANCERLLM_AVX512 void mask_block_avx512(const Word* x, Word* out, int64_t n, uint32_t key, uint32_t low,
                                        uint32_t threshold) {
  const __m512i k = _mm512_set1_epi32(static_cast<int>(key)), t = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512i step = _mm512_set1_epi32(16);
  __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(low)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  constexpr int64_t kWords = 64 / sizeof(Word);
  for (int64_t i = 0; i < n; i += kWords) {
    const int64_t left = std::min(kWords, n - i);
    if constexpr (sizeof(Word) == 2) {
      const __mmask16 lo = keep16(index, k, t), hi = keep16(_mm512_add_epi32(index, step), k, t);
      const __mmask32 in_range = left == kWords ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
      const __mmask32 keep = _mm512_kunpackw(hi, lo);
      _mm512_mask_storeu_epi16(out + i, in_range, _mm512_maskz_loadu_epi16(keep & in_range, x + i));
      index = _mm512_add_epi32(index, _mm512_add_epi32(step, step));
    } else {
      const __mmask16 in_range = left == kWords ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __mmask16 keep = keep16(index, k, t);
      _mm512_mask_storeu_epi32(out + i, in_range, _mm512_maskz_loadu_epi32(keep & in_range, x + i));
      index = _mm512_add_epi32(index, step);
    }
  }
}
#endif

template <typename Word>
void mask_typed(const void* x, void* out, int64_t n, uint64_t seed, uint32_t threshold, int threads,
                bool allow_avx512) {
  const Word* in = static_cast<const Word*>(x);
  Word* o = static_cast<Word*>(out);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  [[maybe_unused]] const bool avx512 = allow_avx512 && cpu_has_avx512();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n >= kParallelValues)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t at = b * kBlock, count = std::min(kBlock, n - at);
    const uint32_t key = hashed_key(seed, at), low = static_cast<uint32_t>(at);
#ifdef CANCERLLM_X86
    if (avx512) {
      mask_block_avx512<Word>(in + at, o + at, count, key, low, threshold);
      continue;
    }
#endif
    mask_block_scalar<Word>(in + at, o + at, count, key, low, threshold);
  }
}

}  // namespace

void hashed_dropout(const void* x, void* out, int bytes, int64_t n, uint64_t seed, uint32_t threshold, int threads,
                    bool allow_avx512) {
  if (bytes == 2) mask_typed<uint16_t>(x, out, n, seed, threshold, threads, allow_avx512);
  else mask_typed<uint32_t>(x, out, n, seed, threshold, threads, allow_avx512);
}

}  // namespace cancerllm
