// Score matmuls on AVX512-BF16 (score_matmul.h): B packed by pairs of K per 16 columns, then tiles of up to 8 rows x
// 32 columns over threads.
#include "score_matmul.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "avx512.h"

namespace cancerllm {
namespace {

constexpr int64_t kTileRows = 8;

// B [N, K] -> for each block of 16 columns and each pair p of K, 16 x (B[n, 2p], B[n, 2p + 1]) = one register's
// 32 bf16; zero past N, and one zero block more so that a tile's second block always exists.
std::vector<uint16_t> pack_by_pairs(const uint16_t* b, int64_t N, int64_t K) {
  const int64_t blocks = (N + 15) / 16 + 1, pairs = K / 2;
  std::vector<uint16_t> packed(blocks * pairs * 32, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < pairs; ++p)
      std::memcpy(&packed[((n / 16 * pairs + p) * 16 + n % 16) * 2], b + n * K + 2 * p, 2 * sizeof(uint16_t));
  return packed;
}

#ifdef CANCERLLM_X86
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16{1} << n) - 1; }

// C[rows r0.., columns n0 .. n0 + 32) (stored up to n_end) for R rows of A.
template <int R>
CANCERLLM_AVX512_BF16 void tile(const uint16_t* a, int64_t K, const uint16_t* packed, int64_t pairs, float* c,
                                int64_t N, int64_t r0, int64_t n0, int64_t n_end) {
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const uint16_t* b0 = packed + (n0 / 16) * pairs * 32;
  const uint16_t* b1 = b0 + pairs * 32;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i w0 = _mm512_loadu_si512(b0 + p * 32), w1 = _mm512_loadu_si512(b1 + p * 32);
    for (int i = 0; i < R; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + (r0 + i) * K + 2 * p, sizeof pair);
      const __m512i x = _mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], reinterpret_cast<__m512bh>(w0), reinterpret_cast<__m512bh>(x));
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], reinterpret_cast<__m512bh>(w1), reinterpret_cast<__m512bh>(x));
    }
  }
  const __mmask16 m0 = first_lanes(n_end - n0), m1 = first_lanes(n_end - n0 - 16);
  for (int i = 0; i < R; ++i) {
    float* row = c + (r0 + i) * N + n0;
    _mm512_mask_storeu_ps(row, m0, acc[i][0]);
    _mm512_mask_storeu_ps(row + 16, m1, acc[i][1]);
  }
}

template <int R>
CANCERLLM_AVX512_BF16 void row_tile(const uint16_t* a, int64_t K, const uint16_t* packed, int64_t pairs, float* c,
                                    int64_t N, int64_t r0, int64_t n_end) {
  for (int64_t n0 = 0; n0 < n_end; n0 += 32) tile<R>(a, K, packed, pairs, c, N, r0, n0, n_end);
}

CANCERLLM_AVX512_BF16 void rows_of(const ScoreMatmulArgs& s, int64_t head, int64_t r0, const uint16_t* packed) {
  const int64_t rows = std::min(kTileRows, s.M - r0), pairs = s.K / 2;
  const int64_t n_end = s.causal_group > 0 ? std::min(s.N, (r0 + rows - 1) / s.causal_group + 1) : s.N;
  const uint16_t* a = s.a + head * s.M * s.K;
  float* c = s.c + head * s.M * s.N;
  switch (rows) {
    case 8: row_tile<8>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
    case 7: row_tile<7>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
    case 6: row_tile<6>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
    case 5: row_tile<5>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
    case 4: row_tile<4>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
    case 3: row_tile<3>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
    case 2: row_tile<2>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
    default: row_tile<1>(a, s.K, packed, pairs, c, s.N, r0, n_end); break;
  }
}
#endif  // CANCERLLM_X86

}  // namespace

void score_matmul(const ScoreMatmulArgs& s, int threads) {
#ifdef CANCERLLM_X86
  std::vector<std::vector<uint16_t>> packed(s.heads);
  for (int64_t h = 0; h < s.heads; ++h) packed[h] = pack_by_pairs(s.b + h * s.N * s.K, s.N, s.K);
  const int64_t tiles = (s.M + kTileRows - 1) / kTileRows;
  // Causal rows need more columns the further down they are: tiles are handed out a few at a time.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
  for (int64_t t = 0; t < s.heads * tiles; ++t) rows_of(s, t / tiles, t % tiles * kTileRows, packed[t / tiles].data());
#else
  (void)s;
  (void)threads;
#endif
}

}  // namespace cancerllm
