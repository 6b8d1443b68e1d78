// Small-M matmuls (gemv.h): an AVX512-BF16 kernel chosen at run time where the CPU has it, a portable one
// everywhere else, rows of W split over OpenMP threads.
#include "gemv.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "amx.h"

namespace cancerllm {
namespace {

// Rows of W a thread handles at a time for every tile of x's rows: they stay in L2 (24 x 1536 bf16 is 72 KiB)
// while x's rows are multiplied by them 8 at a time, so W is read from memory once whatever M is. A multiple of
// every row tile below (8, 6, 4, 2).
constexpr int64_t kRowBlock = 24;
constexpr int kMaxRowsOfX = 8;  // rows of x per tile: 8 x 2 accumulators and 8 rows of x fill the 32 registers

// x's fp32 copy starts on a cache line, so that with K a multiple of 16 every 64-byte load of it is one line: from
// malloc's 16-byte alignment three loads in four were split across two lines, the fp32 kernel's bottleneck.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U> CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U> bool operator==(const CacheLineAllocator<U>&) const { return true; }
};

// One result: times its row's scale, stored in y's type (rounded to bf16 first where the contract says so).
void store(const MatmulArgs& a, int64_t m, int64_t n, float v) {
  if (a.scales) v *= bf16_to_float(a.scales[n]);
  if (a.y_type == Float::BF16) {
    static_cast<uint16_t*>(a.y)[m * a.N + n] = float_to_bf16(v);
  } else {
    static_cast<float*>(a.y)[m * a.N + n] = a.round_to_bf16 ? bf16_to_float(float_to_bf16(v)) : v;
  }
}

// ------------------------------------------------------------------------------------------ portable kernel

float weight_value(const MatmulArgs& a, int64_t i) {
  switch (a.w_type) {
    case Weight::INT8: return static_cast<float>(static_cast<const int8_t*>(a.w)[i]);
    case Weight::F32: return static_cast<const float*>(a.w)[i];
    default: return bf16_to_float(static_cast<const uint16_t*>(a.w)[i]);
  }
}

// Rows [n0, n1) of y from x in fp32 (bf16 values, unless the weights are fp32): each row of W widened once into
// `w_row` (K floats), then its dot product with every row of x in 16 independent partial sums, a loop the compiler
// vectorizes without reassociating.
void portable_rows(const MatmulArgs& a, const float* x, float* w_row, int64_t n0, int64_t n1) {
  constexpr int64_t kLanes = 16;
  const int64_t K = a.K, body = K / kLanes * kLanes;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < K; ++k) w_row[k] = weight_value(a, n * K + k);
    for (int64_t m = 0; m < a.M; ++m) {
      const float* xm = x + m * K;
      float lanes[kLanes] = {};
      for (int64_t k = 0; k < body; k += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += xm[k + j] * w_row[k + j];
      float sum = 0.0f;
      for (int64_t k = body; k < K; ++k) sum += xm[k] * w_row[k];
      for (float lane : lanes) sum += lane;
      store(a, m, n, sum);
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX512-BF16 kernel

#ifdef CANCERLLM_X86

// 32 weights of one row from `offset` on (zero past the mask, when Masked) as bf16: int8 widened exactly
// (|q| <= 127 fits bf16's 8 significant bits), in order, so that pairs (k, k+1) meet x's pairs in the dot product.
template <bool Int8, bool Masked>
CANCERLLM_AVX512_BF16 inline __m512i load_weights(const void* w, int64_t offset, __mmask32 mask) {
  if constexpr (Int8) {
    const int8_t* p = static_cast<const int8_t*>(w) + offset;
    const __m256i q = Masked ? _mm256_maskz_loadu_epi8(mask, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w) + offset;
    return Masked ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p);
  }
}

// 32 steps along K from k: MT rows of x and R rows of W (from row n) into the R x MT accumulators, each loaded
// piece of W multiplied by all MT rows before the next is loaded. Masked: the last, partial step (zeros past K).
template <int MT, int R, bool Int8, bool Masked>
CANCERLLM_AVX512_BF16 inline void step(const MatmulArgs& a, const uint16_t* x, int64_t n, int64_t k, __mmask32 mask,
                                       __m512 (&acc)[MT][R]) {
  const int64_t K = a.K;
  __m512i xv[MT];
  for (int m = 0; m < MT; ++m) {
    xv[m] = Masked ? _mm512_maskz_loadu_epi16(mask, x + m * K + k) : _mm512_loadu_si512(x + m * K + k);
  }
  for (int r = 0; r < R; ++r) {
    const __m512i wv = load_weights<Int8, Masked>(a.w, (n + r) * K + k, mask);
    for (int m = 0; m < MT; ++m)
      acc[m][r] = _mm512_dpbf16_ps(acc[m][r], reinterpret_cast<__m512bh>(wv), reinterpret_cast<__m512bh>(xv[m]));
  }
}

// Dot products of R rows of W (from row n) with MT rows of x (bf16, from `x`), in fp32 partial sums. The loop
// runs whole steps unmasked: GCC keeps the accumulators in registers only then (with masked loads in the loop it
// stored every one to the stack at every step).
// Dot products of R rows of W (from row n) with MT rows of x (bf16, from `x`), in fp32 partial sums. The loop
// runs whole steps unmasked: GCC keeps the accumulators in registers only then (with masked loads in the loop it
// stored every one to the stack at every step).
template <int MT, int R, bool Int8>
CANCERLLM_AVX512_BF16 void tile(const MatmulArgs& a, const uint16_t* x, int64_t n, float out[MT][R]) {
  const int64_t K = a.K;
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  // Several rows are one contiguous run of W, but read as R short streams that the hardware prefetcher does not
  // follow in time: fetch the next tile's run at the rate this one is consumed. One row is one stream it follows.
  constexpr int64_t kBytes = Int8 ? 1 : 2;
  const char* next = static_cast<const char*>(a.w) + (n + R) * K * kBytes;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if constexpr (R > 1) {
      for (int64_t line = 0; line < R * 32 * kBytes; line += 64) {
        _mm_prefetch(next + k * R * kBytes + line, _MM_HINT_T0);
      }
    }
    step<MT, R, Int8, false>(a, x, n, k, 0, acc);
  }
  if (k < K) step<MT, R, Int8, true>(a, x, n, k, (__mmask32{1} << (K - k)) - 1, acc);
  const __m512* flat = &acc[0][0];   // in out's order
  float* sums = &out[0][0];
  int i = 0;
  for (; i + 4 <= R * MT; i += 4) _mm_storeu_ps(sums + i, sum_lanes4(flat[i], flat[i + 1], flat[i + 2], flat[i + 3]));
  for (; i < R * MT; ++i) sums[i] = sum_lanes(flat[i]);
}

// y[m, n:n+count] from their sums (count <= 8): store()'s arithmetic on 8 lanes at once.
CANCERLLM_AVX512_BF16 inline void store_run(const MatmulArgs& a, int64_t m, int64_t n, const float* sums, int count) {
  const __mmask8 mask = static_cast<__mmask8>((1u << count) - 1);
  __m256 v = _mm256_maskz_loadu_ps(mask, sums);
  if (a.scales) {
    const __m128i scales = _mm_maskz_loadu_epi16(mask, a.scales + n);
    v = _mm256_mul_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(scales), 16)));
  }
  const int64_t at = m * a.N + n;
  if (a.y_type == Float::BF16) {
    _mm_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + at, mask, reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(v)));
    return;
  }
  if (a.round_to_bf16) {
    const __m128i rounded = reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(v));
    v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(rounded), 16));
  }
  _mm256_mask_storeu_ps(static_cast<float*>(a.y) + at, mask, v);
}

// Rows of W per tile, as many as x's rows leave registers for. At M = 1: bf16 rows one at a time (one stream the
// hardware prefetcher follows, fastest in bench/gemv.py), int8 rows 8 at a time (their widening needs the
// independent work of several rows to keep up with memory).
constexpr int rows_per_tile(int mt, bool int8) { return mt == 1 ? (int8 ? 8 : 1) : mt == 2 ? 6 : mt <= 4 ? 4 : 2; }

template <int MT, int R, bool Int8>
CANCERLLM_AVX512_BF16 int64_t tiles(const MatmulArgs& a, const uint16_t* x, int64_t m0, int64_t n, int64_t n1) {
  float out[MT][R];
  for (; n + R <= n1; n += R) {
    tile<MT, R, Int8>(a, x + m0 * a.K, n, out);
    for (int m = 0; m < MT; ++m) store_run(a, m0 + m, n, out[m], R);
  }
  return n;
}

// Rows [n0, n1) of y for MT rows of x from m0: in tiles of rows_per_tile(MT, Int8) rows of W, the rest one by one.
template <int MT, bool Int8>
CANCERLLM_AVX512_BF16 void avx512_rows(const MatmulArgs& a, const uint16_t* x, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t n = tiles<MT, rows_per_tile(MT, Int8), Int8>(a, x, m0, n0, n1);
  tiles<MT, 1, Int8>(a, x, m0, n, n1);
}

template <bool Int8>
CANCERLLM_AVX512_BF16 void avx512_rows_of_x(const MatmulArgs& a, const uint16_t* x, int64_t m0, int mt, int64_t n0,
                                           int64_t n1) {
  switch (mt) {
    case 1: return avx512_rows<1, Int8>(a, x, m0, n0, n1);
    case 2: return avx512_rows<2, Int8>(a, x, m0, n0, n1);
    case 3: return avx512_rows<3, Int8>(a, x, m0, n0, n1);
    case 4: return avx512_rows<4, Int8>(a, x, m0, n0, n1);
    case 5: return avx512_rows<5, Int8>(a, x, m0, n0, n1);
    case 6: return avx512_rows<6, Int8>(a, x, m0, n0, n1);
    case 7: return avx512_rows<7, Int8>(a, x, m0, n0, n1);
    default: return avx512_rows<8, Int8>(a, x, m0, n0, n1);
  }
}

// Rows [n0, n1) of y: block by block of W's rows, every tile of x's rows against the block.
void fast_rows(const MatmulArgs& a, const uint16_t* x, int64_t n0, int64_t n1) {
  for (int64_t block = n0; block < n1; block += kRowBlock) {
    const int64_t end = std::min(n1, block + kRowBlock);
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowsOfX) {
      const int mt = static_cast<int>(std::min<int64_t>(kMaxRowsOfX, a.M - m0));
      if (a.w_type == Weight::INT8) {
        avx512_rows_of_x<true>(a, x, m0, mt, block, end);
      } else {
        avx512_rows_of_x<false>(a, x, m0, mt, block, end);
      }
    }
  }
}

// fp32 weights: one step of 16 along K from k, R rows of W (from row n) and MT rows of x into the MT x R
// accumulators, each loaded piece of x multiplied by all R rows of W: at several rows of x a one-row tile issued a
// load of x per multiply-add and ran at a quarter of oneDNN's fp32 rate (docs/experiments.md). Masked: the last,
// partial step.
template <int MT, int R, bool Masked>
CANCERLLM_AVX512 inline void f32_step(const MatmulArgs& a, const float* x, int64_t n, int64_t k, __mmask16 mask,
                                      __m512 (&acc)[MT][R]) {
  const int64_t K = a.K;
  const float* w = static_cast<const float*>(a.w);
  __m512 wv[R];
  for (int r = 0; r < R; ++r)
    wv[r] = Masked ? _mm512_maskz_loadu_ps(mask, w + (n + r) * K + k) : _mm512_loadu_ps(w + (n + r) * K + k);
  for (int m = 0; m < MT; ++m) {
    __m512 xv = Masked ? _mm512_maskz_loadu_ps(mask, x + m * K + k) : _mm512_loadu_ps(x + m * K + k);
    asm("" : "+v"(xv));   // kept in a register: GCC otherwise folds the load into each of the R multiply-adds
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
  }
}

// Dot products of R rows of W (from row n) with MT rows of x (from `x`), one fp32 accumulator per output summed
// along K in steps of 16 and reduced by sum_lanes(4): the same order whatever MT and R are (batch-invariant).
template <int MT, int R>
CANCERLLM_AVX512 void f32_tile(const MatmulArgs& a, const float* x, int64_t n, float out[MT][R]) {
  const int64_t K = a.K;
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(static_cast<const float*>(a.w) + (n + R) * K);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if constexpr (R > 1) {   // R short streams the hardware prefetcher does not follow in time (as tile() above)
      for (int64_t line = 0; line < R * 64; line += 64) _mm_prefetch(next + k * R * 4 + line, _MM_HINT_T0);
    }
    f32_step<MT, R, false>(a, x, n, k, 0, acc);
  }
  if (k < K) f32_step<MT, R, true>(a, x, n, k, static_cast<__mmask16>((1u << (K - k)) - 1), acc);
  const __m512* flat = &acc[0][0];
  float* sums = &out[0][0];
  int i = 0;
  for (; i + 4 <= R * MT; i += 4) _mm_storeu_ps(sums + i, sum_lanes4(flat[i], flat[i + 1], flat[i + 2], flat[i + 3]));
  for (; i < R * MT; ++i) sums[i] = sum_lanes(flat[i]);
}

// Rows of W per fp32 tile: MT x R accumulators, R pieces of W and one of x within the 32 registers.
constexpr int f32_rows_per_tile(int mt) { return mt == 1 ? 1 : mt == 2 ? 8 : mt <= 4 ? 6 : mt <= 6 ? 4 : 3; }

template <int MT, int R>
CANCERLLM_AVX512 int64_t f32_tiles(const MatmulArgs& a, const float* x, int64_t m0, int64_t n, int64_t n1) {
  float out[MT][R];
  for (; n + R <= n1; n += R) {
    f32_tile<MT, R>(a, x + m0 * a.K, n, out);
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) store(a, m0 + m, n + r, out[m][r]);
  }
  return n;
}

template <int MT>
CANCERLLM_AVX512 void f32_rows_of(const MatmulArgs& a, const float* x, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t n = f32_tiles<MT, f32_rows_per_tile(MT)>(a, x, m0, n0, n1);
  f32_tiles<MT, 1>(a, x, m0, n, n1);
}

// Rows [n0, n1) of y for fp32 weights: block by block of W's rows, every tile of up to 8 rows of x against it.
CANCERLLM_AVX512 void f32_rows(const MatmulArgs& a, const float* x, int64_t n0, int64_t n1) {
  for (int64_t block = n0; block < n1; block += kRowBlock) {
    const int64_t end = std::min(n1, block + kRowBlock);
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowsOfX) {
      switch (std::min<int64_t>(kMaxRowsOfX, a.M - m0)) {
        case 1: f32_rows_of<1>(a, x, m0, block, end); break;
        case 2: f32_rows_of<2>(a, x, m0, block, end); break;
        case 3: f32_rows_of<3>(a, x, m0, block, end); break;
        case 4: f32_rows_of<4>(a, x, m0, block, end); break;
        case 5: f32_rows_of<5>(a, x, m0, block, end); break;
        case 6: f32_rows_of<6>(a, x, m0, block, end); break;
        case 7: f32_rows_of<7>(a, x, m0, block, end); break;
        default: f32_rows_of<8>(a, x, m0, block, end); break;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ AMX kernel (bf16 W)

// A C block of 16 rows of W x 16 rows of x accumulates in a tile register over K in slices of 32: W's 16 rows of a
// slice are the A operand, read in place (stride K); x's 16 rows are the B operand, packed by pairs of K once per
// call (pack_by_pairs, zero past M and K). Every output's sum runs slice by slice in the tiles' order whatever M is:
// batch-invariant, like the AVX512 kernel. One block of W at a time (16 streams of its rows): passes over 2 or 4
// blocks (more products per load of x) streamed W slower from memory here, at every M (docs/experiments.md).
constexpr int64_t kAmxRows = 16, kAmxSlice = 32;

// Tile 0: the C block; 1: x's slice (16 pairs x 16 rows); 2: W's slice (16 rows x 32).
CANCERLLM_AMX void configure_gemv_tiles() {
  TileConfig config;
  for (int t = 0; t < 3; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// c (16 rows of W x 16 rows of x, fp32) = W's 16 rows from `w` (stride K) times x's block `x_slices` (its packed
// slices, 16 x 32 values each). `tail`: the last, partial slice of K as 16 x 32 values, zero past K (null when K is
// a multiple of 32). `next`: the next block's rows, fetched into L2 a `step` of bytes per slice, at the rate this
// block consumes W (16 streams are more than the hardware prefetcher follows in time).
CANCERLLM_AMX void amx_block(const uint16_t* w, int64_t K, const uint16_t* tail, const uint16_t* x_slices,
                             const char* next, int64_t step, float* c) {
  _tile_zero(0);
  const int64_t whole = K / kAmxSlice;
  for (int64_t s = 0; s < whole; ++s) {
    _tile_loadd(1, x_slices + s * kAmxRows * kAmxSlice, 64);
    _tile_loadd(2, w + s * kAmxSlice, K * 2);
    _tile_dpbf16ps(0, 2, 1);
    for (int64_t line = 0; next && line < step; line += 64) _mm_prefetch(next + s * step + line, _MM_HINT_T1);
  }
  if (tail) {
    _tile_loadd(1, x_slices + whole * kAmxRows * kAmxSlice, 64);
    _tile_loadd(2, tail, kAmxSlice * 2);
    _tile_dpbf16ps(0, 2, 1);
  }
  _tile_stored(0, c, kAmxRows * 4);
}

// Rows [n0, n1) of y (n0 a multiple of 16) from x packed by pairs (`packed`), between configuring this thread's
// tile registers and releasing them. W's last block, when N is not a multiple of 16, is read from a copy padded
// with zero rows.
CANCERLLM_AMX void amx_rows(const MatmulArgs& a, const uint16_t* packed, int64_t n0, int64_t n1) {
  configure_gemv_tiles();
  const int64_t K = a.K, N = a.N, whole = K / kAmxSlice * kAmxSlice, rest = K - whole;
  const int64_t slices = (K + kAmxSlice - 1) / kAmxSlice, x_blocks = (a.M + kAmxRows - 1) / kAmxRows;
  std::vector<uint16_t> tail(rest ? kAmxRows * kAmxSlice : 0), last_rows;
  alignas(64) float c[kAmxRows * kAmxRows], column[kAmxRows];
  const __m512i down_a_column = _mm512_mullo_epi32(  // c's column m, the outputs of y's row m
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(kAmxRows));
  for (int64_t n = n0; n < n1; n += kAmxRows) {
    const int64_t count = std::min(kAmxRows, N - n);
    const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
    if (count < kAmxRows) {
      last_rows.assign(kAmxRows * K, 0);
      std::memcpy(last_rows.data(), w, count * K * sizeof(uint16_t));
      w = last_rows.data();
    }
    for (int64_t r = 0; rest && r < kAmxRows; ++r) std::memcpy(&tail[r * kAmxSlice], w + r * K + whole, rest * 2);
    // The next block of this thread's rows, fetched while this one is multiplied by x's first block.
    const char* next = n + kAmxRows < n1 ? reinterpret_cast<const char*>(w + kAmxRows * K) : nullptr;
    const int64_t next_bytes = std::min(kAmxRows, n1 - n - kAmxRows) * K * 2;
    const int64_t step = whole ? (next_bytes * kAmxSlice / whole + 63) / 64 * 64 : 0;
    for (int64_t xb = 0; xb < x_blocks; ++xb) {
      amx_block(w, K, rest ? tail.data() : nullptr, packed + xb * slices * kAmxRows * kAmxSlice,
                xb == 0 ? next : nullptr, step, c);
      for (int64_t m = xb * kAmxRows; m < std::min(a.M, (xb + 1) * kAmxRows); ++m) {
        _mm512_store_ps(column, _mm512_i32gather_ps(down_a_column, c + m % kAmxRows, 4));
        store_run(a, m, n, column, static_cast<int>(std::min<int64_t>(8, count)));
        if (count > 8) store_run(a, m, n + 8, column + 8, static_cast<int>(count - 8));
      }
    }
  }
  _tile_release();
}

// y = x @ W^T for bf16 W on AMX: x (bf16) packed once, then blocks of W's rows split over threads.
void amx_matmul(const MatmulArgs& a, const uint16_t* x, int threads) {
  const int64_t slices = (a.K + kAmxSlice - 1) / kAmxSlice;
  const std::vector<uint16_t> packed =
      pack_by_pairs(x, a.M, a.K, slices * kAmxSlice / 2, (a.M + kAmxRows - 1) / kAmxRows);
  const int64_t blocks = (a.N + kAmxRows - 1) / kAmxRows;
  const int64_t per_thread = (blocks + threads - 1) / std::max(threads, 1) * kAmxRows;
  const int count = static_cast<int>((a.N + per_thread - 1) / per_thread);
#pragma omp parallel for num_threads(count) schedule(static, 1) if (count > 1)
  for (int i = 0; i < count; ++i) amx_rows(a, packed.data(), i * per_thread, std::min(a.N, (i + 1) * per_thread));
}
#endif  // CANCERLLM_X86

}  // namespace

bool has_avx512_bf16() {
#ifdef CANCERLLM_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void small_matmul(const MatmulArgs& a, int threads, Kernel kernel) {
  const bool f32 = a.w_type == Weight::F32;
  const bool fast = kernel != Kernel::Portable && (f32 ? cpu_has_avx512() : has_avx512_bf16());
  const int64_t MK = a.M * a.K;
  // x as the kernels read it: for bf16 and int8 weights bf16 (the fast kernel) or fp32 holding bf16 values (the
  // portable one); for fp32 weights fp32.
  std::vector<uint16_t> x_bf16;
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  if (a.x_type == Float::F32 && !f32) {
    x_bf16.resize(MK);
    for (int64_t i = 0; i < MK; ++i) x_bf16[i] = float_to_bf16(static_cast<const float*>(a.x)[i]);
    x = x_bf16.data();
  }
#ifdef CANCERLLM_X86
  if (kernel == Kernel::Best && a.w_type == Weight::BF16 && has_amx()) return amx_matmul(a, x, threads);
#endif
  // Whole blocks of rows per thread, as many threads as there are blocks at most.
  const int64_t blocks = (a.N + kRowBlock - 1) / kRowBlock;
  const int64_t per_thread = (blocks + threads - 1) / std::max(threads, 1) * kRowBlock;
  const int count = static_cast<int>((a.N + per_thread - 1) / per_thread);
  std::vector<float, CacheLineAllocator<float>> x_float;
  std::vector<float> w_rows;
  if (!fast || f32) {
    x_float.resize(MK);
    for (int64_t i = 0; i < MK; ++i) x_float[i] = f32 ? load_float(a.x, a.x_type, i) : bf16_to_float(x[i]);
  }
  if (!fast) w_rows.resize(count * a.K);
  // OpenMP: the runtime torch's own parallel ops use (libgomp, loaded once per process), so our threads are
  // torch's threads. A pool of our own (tried first) fought torch's spinning OpenMP workers for the cores: at 2
  // threads decoding ran slower than at 1.
#pragma omp parallel for num_threads(count) schedule(static, 1) if (count > 1)
  for (int i = 0; i < count; ++i) {
    const int64_t n0 = i * per_thread, n1 = std::min(a.N, n0 + per_thread);
#ifdef CANCERLLM_X86
    if (fast) {
      if (f32) {
        f32_rows(a, x_float.data(), n0, n1);
      } else {
        fast_rows(a, x, n0, n1);
      }
      continue;
    }
#endif
    portable_rows(a, x_float.data(), w_rows.data() + i * a.K, n0, n1);
  }
}

}  // namespace cancerllm
