// Score matmuls on AMX or AVX512-BF16 (score_matmul.h): B packed by pairs of K per 16 columns, then tiles of up to
// 16 (AMX) or 8 rows x 32 columns over threads.
#include "score_matmul.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx.h"

namespace cancerllm {
namespace {

constexpr int64_t kTileRows = 8;

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

// AMX: a tile register holds 16 rows of 64 bytes. C blocks of 16 x 16 fp32 accumulate A (16 rows x 32 bf16 of K)
// times B (16 pairs of K x 16 columns, which is one block of pack_by_pairs' layout as it stands).
constexpr int64_t kAmxRows = 16;

// Tiles 0, 1: two C blocks side by side (32 columns); 2: A's 32-wide slice of K; 3, 4: the two B blocks for it;
// 5, 6, 7: the same for K's last K % 32 (a 64- or 128-wide head has none).
CANCERLLM_AMX void configure_tiles(int64_t K) {
  TileConfig config;
  for (int t = 0; t < 5; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  const int rest = static_cast<int>(K % 32);
  if (rest) {
    config.bytes_per_row[5] = 2 * rest, config.rows[5] = 16;
    for (int t = 6; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = rest / 2;
  }
  _tile_loadconfig(&config);
}

// C[r0 .. r0 + 16, 0 .. n_end) of one head. A block's rows past M come from `a_pad` (zeros), and a block that
// reaches past M or n_end is stored to `c_pad` first, then its part in range copied out.
CANCERLLM_AMX void amx_rows_of(const ScoreMatmulArgs& s, int64_t head, int64_t r0, const uint16_t* packed,
                               uint16_t* a_pad, float* c_pad) {
  const int64_t rows = std::min(kAmxRows, s.M - r0), pairs = s.K / 2, whole = s.K / 32 * 32;
  const int64_t n_end = s.causal_group > 0 ? std::min(s.N, (r0 + rows - 1) / s.causal_group + 1) : s.N;
  const uint16_t* a = s.a + (head * s.M + r0) * s.K;
  if (rows < kAmxRows) {
    std::memcpy(a_pad, a, rows * s.K * sizeof(uint16_t));
    std::memset(a_pad + rows * s.K, 0, (kAmxRows - rows) * s.K * sizeof(uint16_t));
    a = a_pad;
  }
  float* c = s.c + (head * s.M + r0) * s.N;
  for (int64_t n0 = 0; n0 < n_end; n0 += 32) {
    const uint16_t* b0 = packed + (n0 / 16) * pairs * 32;
    const uint16_t* b1 = b0 + pairs * 32;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < whole; k += 32) {
      _tile_loadd(2, a + k, s.K * 2);
      _tile_loadd(3, b0 + k * 16, 64);   // pairs k/2 .. k/2 + 15, 32 bf16 each
      _tile_loadd(4, b1 + k * 16, 64);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
    }
    if (whole < s.K) {
      _tile_loadd(5, a + whole, s.K * 2);
      _tile_loadd(6, b0 + whole * 16, 64);
      _tile_loadd(7, b1 + whole * 16, 64);
      _tile_dpbf16ps(0, 5, 6);
      _tile_dpbf16ps(1, 5, 7);
    }
    if (rows == kAmxRows && n0 + 32 <= n_end) {
      _tile_stored(0, c + n0, s.N * 4);
      _tile_stored(1, c + n0 + 16, s.N * 4);
      continue;
    }
    _tile_stored(0, c_pad, 32 * 4);
    _tile_stored(1, c_pad + 16, 32 * 4);
    const int64_t columns = std::min<int64_t>(32, n_end - n0);
    for (int64_t i = 0; i < rows; ++i) std::memcpy(c + i * s.N + n0, c_pad + i * 32, columns * sizeof(float));
  }
}

// One thread's share of the row blocks, between configuring its tile registers and releasing them.
CANCERLLM_AMX void amx_blocks(const ScoreMatmulArgs& s, const std::vector<std::vector<uint16_t>>& packed) {
  configure_tiles(s.K);
  std::vector<uint16_t> a_pad(kAmxRows * s.K);
  std::vector<float> c_pad(kAmxRows * 32);
  const int64_t blocks = (s.M + kAmxRows - 1) / kAmxRows;
#pragma omp for schedule(dynamic, 2)
  for (int64_t t = 0; t < s.heads * blocks; ++t)
    amx_rows_of(s, t / blocks, t % blocks * kAmxRows, packed[t / blocks].data(), a_pad.data(), c_pad.data());
  _tile_release();
}
#endif  // CANCERLLM_X86

}  // namespace

void score_matmul(const ScoreMatmulArgs& s, int threads) {
#ifdef CANCERLLM_X86
  std::vector<std::vector<uint16_t>> packed(s.heads);
  // One zero block past N, so that a tile's second block of 16 columns always exists.
  for (int64_t h = 0; h < s.heads; ++h)
    packed[h] = pack_by_pairs(s.b + h * s.N * s.K, s.N, s.K, s.K / 2, (s.N + 15) / 16 + 1);
  if (s.allow_amx && has_amx()) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    amx_blocks(s, packed);
    return;
  }
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
