// Score matmuls on AMX or AVX512-BF16 (score_matmul.h): B packed by pairs of K per 16 columns, then tiles of up to
// 16 (AMX) or 8 rows x 32 columns over threads.
#include "score_matmul.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx.h"
#include "attention_softmax.h"

namespace cancerllm {
namespace {

constexpr int64_t kTileRows = 8;
using PackedHeads = std::vector<std::vector<uint16_t>>;   // each head's B as pack_by_pairs lays it out

// The columns rows [r0, r0 + rows) need: all N, or with causal_group > 0 those up to the last row's position.
int64_t columns_for(int64_t N, int64_t causal_group, int64_t r0, int64_t rows) {
  return causal_group > 0 ? std::min(N, (r0 + rows - 1) / causal_group + 1) : N;
}

// Each head's rows in blocks of `block_rows`, shared over the calling team's threads a few at a time (causal rows
// need more columns the further down they are): block(head, r0, rows, at), `at` = head * M + r0 among all heads' rows.
template <typename Block>
void each_block(int64_t heads, int64_t M, int64_t block_rows, Block block) {
  const int64_t blocks = (M + block_rows - 1) / block_rows;
#pragma omp for schedule(dynamic, 2)
  for (int64_t t = 0; t < heads * blocks; ++t) {
    const int64_t head = t / blocks, r0 = t % blocks * block_rows;
    block(head, r0, std::min(block_rows, M - r0), head * M + r0);
  }
}

#ifdef CANCERLLM_X86
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16{1} << n) - 1; }

// C[0 .. R, columns n0 .. n0 + 32) (stored up to n_end) for the R rows of A at a (row stride K); C's rows ldc apart.
template <int R>
CANCERLLM_AVX512_BF16 void tile(const uint16_t* a, int64_t K, const uint16_t* packed, int64_t pairs, float* c,
                                int64_t ldc, int64_t n0, int64_t n_end) {
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const uint16_t* b0 = packed + (n0 / 16) * pairs * 32;
  const uint16_t* b1 = b0 + pairs * 32;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i w0 = _mm512_loadu_si512(b0 + p * 32), w1 = _mm512_loadu_si512(b1 + p * 32);
    for (int i = 0; i < R; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * K + 2 * p, sizeof pair);
      const __m512i x = _mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], reinterpret_cast<__m512bh>(w0), reinterpret_cast<__m512bh>(x));
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], reinterpret_cast<__m512bh>(w1), reinterpret_cast<__m512bh>(x));
    }
  }
  const __mmask16 m0 = first_lanes(n_end - n0), m1 = first_lanes(n_end - n0 - 16);
  for (int i = 0; i < R; ++i) {
    float* row = c + i * ldc + n0;
    _mm512_mask_storeu_ps(row, m0, acc[i][0]);
    _mm512_mask_storeu_ps(row + 16, m1, acc[i][1]);
  }
}

template <int R>
CANCERLLM_AVX512_BF16 void row_tile(const uint16_t* a, int64_t K, const uint16_t* packed, float* c, int64_t ldc,
                                    int64_t n_end) {
  for (int64_t n0 = 0; n0 < n_end; n0 += 32) tile<R>(a, K, packed, K / 2, c, ldc, n0, n_end);
}

// C[0 .. rows, 0 .. n_end) for `rows` (at most kTileRows) rows of A at a.
CANCERLLM_AVX512_BF16 void avx512_block(const uint16_t* a, int64_t rows, int64_t K, const uint16_t* packed,
                                        float* c, int64_t ldc, int64_t n_end) {
  switch (rows) {
    case 8: row_tile<8>(a, K, packed, c, ldc, n_end); break;
    case 7: row_tile<7>(a, K, packed, c, ldc, n_end); break;
    case 6: row_tile<6>(a, K, packed, c, ldc, n_end); break;
    case 5: row_tile<5>(a, K, packed, c, ldc, n_end); break;
    case 4: row_tile<4>(a, K, packed, c, ldc, n_end); break;
    case 3: row_tile<3>(a, K, packed, c, ldc, n_end); break;
    case 2: row_tile<2>(a, K, packed, c, ldc, n_end); break;
    default: row_tile<1>(a, K, packed, c, ldc, n_end); break;
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

// C[0 .. rows, 0 .. n_end) for `rows` (at most 16) rows of A at a. A block's rows past `rows` come from `a_pad`
// (zeros), and a block that reaches past them or n_end is stored to `c_pad` first, then its part in range copied out.
CANCERLLM_AMX void amx_block(const uint16_t* a, int64_t rows, int64_t K, const uint16_t* packed, float* c,
                             int64_t ldc, int64_t n_end, uint16_t* a_pad, float* c_pad) {
  const int64_t pairs = K / 2, whole = K / 32 * 32;
  if (rows < kAmxRows) {
    std::memcpy(a_pad, a, rows * K * sizeof(uint16_t));
    std::memset(a_pad + rows * K, 0, (kAmxRows - rows) * K * sizeof(uint16_t));
    a = a_pad;
  }
  for (int64_t n0 = 0; n0 < n_end; n0 += 32) {
    const uint16_t* b0 = packed + (n0 / 16) * pairs * 32;
    const uint16_t* b1 = b0 + pairs * 32;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < whole; k += 32) {
      _tile_loadd(2, a + k, K * 2);
      _tile_loadd(3, b0 + k * 16, 64);   // pairs k/2 .. k/2 + 15, 32 bf16 each
      _tile_loadd(4, b1 + k * 16, 64);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
    }
    if (whole < K) {
      _tile_loadd(5, a + whole, K * 2);
      _tile_loadd(6, b0 + whole * 16, 64);
      _tile_loadd(7, b1 + whole * 16, 64);
      _tile_dpbf16ps(0, 5, 6);
      _tile_dpbf16ps(1, 5, 7);
    }
    if (rows == kAmxRows && n0 + 32 <= n_end) {
      _tile_stored(0, c + n0, ldc * 4);
      _tile_stored(1, c + n0 + 16, ldc * 4);
      continue;
    }
    _tile_stored(0, c_pad, 32 * 4);
    _tile_stored(1, c_pad + 16, 32 * 4);
    const int64_t columns = std::min<int64_t>(32, n_end - n0);
    for (int64_t i = 0; i < rows; ++i) std::memcpy(c + i * ldc + n0, c_pad + i * 32, columns * sizeof(float));
  }
}

// One thread's share of the row blocks, between configuring its tile registers and releasing them.
CANCERLLM_AMX void amx_blocks(const ScoreMatmulArgs& s, const PackedHeads& packed) {
  configure_tiles(s.K);
  std::vector<uint16_t> a_pad(kAmxRows * s.K);
  std::vector<float> c_pad(kAmxRows * 32);
  each_block(s.heads, s.M, kAmxRows, [&](int64_t head, int64_t r0, int64_t rows, int64_t at) {
    amx_block(s.a + at * s.K, rows, s.K, packed[head].data(), s.c + at * s.N, s.N,
              columns_for(s.N, s.causal_group, r0, rows), a_pad.data(), c_pad.data());
  });
  _tile_release();
}

// The fused backward's rows [at, at + rows) (of all heads' rows) from their S and dP rows in the thread's buffers.
void softmax_backward_rows(const AttentionBackwardArgs& s, int64_t at, int64_t rows, const float* scores,
                           const float* grad_probs, float* p, float* g) {
  const SoftmaxRows shape{s.heads * s.M, s.N, s.group, s.window, s.scale};
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = at + i;
    attention_softmax_backward_row(shape, r, scores + i * s.N, grad_probs + i * s.N, s.lse[r], s.delta[r],
                                   s.probs + r * s.N, s.grad_scores + r * s.N, p, g);
  }
}

// Buffers of one thread of the fused backward: S and dP for a block of rows, the softmax's two rows.
struct BackwardScratch {
  std::vector<float> scores, grad_probs, p, g;
  BackwardScratch(int64_t block_rows, int64_t N) : scores(block_rows * N), grad_probs(block_rows * N), p(N), g(N) {}
};

// One thread's share of the fused backward: blocks of `block_rows` rows, each block's S and dP made by `product`
// (score_matmul's tiles for one block: A's rows, their count, B packed, C, its columns), then its rows' softmax.
template <typename Product>
void backward_blocks(const AttentionBackwardArgs& s, const PackedHeads& keys, const PackedHeads& values,
                     int64_t block_rows, Product product) {
  BackwardScratch b(block_rows, s.N);
  each_block(s.heads, s.M, block_rows, [&](int64_t head, int64_t r0, int64_t rows, int64_t at) {
    const int64_t n_end = columns_for(s.N, s.group, r0, rows);
    product(s.q + at * s.K, rows, keys[head].data(), b.scores.data(), n_end);
    product(s.grad_out + at * s.K, rows, values[head].data(), b.grad_probs.data(), n_end);
    softmax_backward_rows(s, at, rows, b.scores.data(), b.grad_probs.data(), b.p.data(), b.g.data());
  });
}

CANCERLLM_AMX void amx_backward_blocks(const AttentionBackwardArgs& s, const PackedHeads& keys,
                                       const PackedHeads& values) {
  configure_tiles(s.K);
  std::vector<uint16_t> a_pad(kAmxRows * s.K);
  std::vector<float> c_pad(kAmxRows * 32);
  backward_blocks(s, keys, values, kAmxRows, [&](const uint16_t* a, int64_t rows, const uint16_t* packed, float* c,
                                                 int64_t n_end) {
    amx_block(a, rows, s.K, packed, c, s.N, n_end, a_pad.data(), c_pad.data());
  });
  _tile_release();
}

void avx512_backward_blocks(const AttentionBackwardArgs& s, const PackedHeads& keys, const PackedHeads& values) {
  backward_blocks(s, keys, values, kTileRows, [&](const uint16_t* a, int64_t rows, const uint16_t* packed, float* c,
                                                  int64_t n_end) {
    avx512_block(a, rows, s.K, packed, c, s.N, n_end);
  });
}

// Each head's B as the tiles read it, with one zero block past N (a tile's second block of 16 columns always exists).
PackedHeads packed_heads(const uint16_t* b, int64_t heads, int64_t N, int64_t K) {
  PackedHeads packed(heads);
  for (int64_t h = 0; h < heads; ++h) packed[h] = pack_by_pairs(b + h * N * K, N, K, K / 2, (N + 15) / 16 + 1);
  return packed;
}
#endif  // CANCERLLM_X86

}  // namespace

void score_matmul(const ScoreMatmulArgs& s, int threads) {
#ifdef CANCERLLM_X86
  const auto packed = packed_heads(s.b, s.heads, s.N, s.K);
  if (s.allow_amx && has_amx()) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    amx_blocks(s, packed);
    return;
  }
#pragma omp parallel num_threads(threads) if (threads > 1)
  each_block(s.heads, s.M, kTileRows, [&](int64_t head, int64_t r0, int64_t rows, int64_t at) {
    avx512_block(s.a + at * s.K, rows, s.K, packed[head].data(), s.c + at * s.N, s.N,
                 columns_for(s.N, s.causal_group, r0, rows));
  });
#else
  (void)s;
  (void)threads;
#endif
}

void attention_backward_scores(const AttentionBackwardArgs& s, int threads) {
#ifdef CANCERLLM_X86
  const auto keys = packed_heads(s.k, s.heads, s.N, s.K), values = packed_heads(s.v, s.heads, s.N, s.K);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    if (s.allow_amx && has_amx()) amx_backward_blocks(s, keys, values);
    else avx512_backward_blocks(s, keys, values);
  }
#else
  (void)s;
  (void)threads;
#endif
}

}  // namespace cancerllm
