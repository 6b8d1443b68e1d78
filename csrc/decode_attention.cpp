// Single-token cached attention (decode_attention.h): one task per (row, KV head), in fp32 whatever the cache
// holds. Where the CPU has AVX512 the products run on explicit AVX512 loops (picked at run time); elsewhere on
// portable loops written for the compiler to vectorize (`omp simd`), cloned for AVX2 and baseline x86.
#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

#include "avx512.h"
#include "fast_exp.h"

namespace cancerllm {
namespace {

// Attention work (query heads x slots x head width) below which one thread does it all: an OpenMP fork costs
// more than it saves on a short cache.
constexpr int64_t kParallelWork = int64_t{1} << 16;


// Head `head` of row i's fused projection in fp32, its halves rotated by the row's angles when `rotate`, then
// rounded to the activations' type (the rotated tensor torch would hold).
void load_head(const DecodeAttentionArgs& a, int64_t i, int64_t head, bool rotate, float* dst) {
  const int64_t D = a.D, half = D / 2, at = (i * (a.Hq + 2 * a.Hkv) + head) * D;
  for (int64_t d = 0; d < D; ++d) dst[d] = load_float(a.qkv, a.type, at + d);
  if (!rotate) return;
  const float* cos = a.cos + i * half;
  const float* sin = a.sin + i * half;
  for (int64_t d = 0; d < half; ++d) {
    const float x1 = dst[d], x2 = dst[d + half];
    dst[d] = round_to(a.type, x1 * cos[d] - x2 * sin[d]);
    dst[d + half] = round_to(a.type, x2 * cos[d] + x1 * sin[d]);
  }
}

// Slot `slot` of a [S, D] cache head as fp32: a pointer into it (fp32 cache) or its widening into `buffer`.
// (Inlined into each clone of its callers.)
inline const float* cached(const void* head, Float type, int64_t slot, int64_t D, float* buffer) {
  if (type == Float::F32) return static_cast<const float*>(head) + slot * D;
  const uint16_t* src = static_cast<const uint16_t*>(head) + slot * D;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const uint32_t bits = uint32_t{src[d]} << 16;
    std::memcpy(buffer + d, &bits, sizeof bits);
  }
  return buffer;
}

// The scores of `groups` queries [groups, D] against the visible slots' keys, scaled: scores[g * count + j].
CANCERLLM_SIMD_CLONES void scores_of(const void* keys, Float type, const std::vector<int64_t>& visible,
                                       const float* q, int64_t groups, int64_t D, float scale, float* buffer,
                                       float* scores) {
  const int64_t count = static_cast<int64_t>(visible.size());
  for (int64_t j = 0; j < count; ++j) {
    const float* k = cached(keys, type, visible[j], D, buffer);
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = q + g * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
      scores[g * count + j] = dot * scale;
    }
  }
}

// scores [groups, count] -> softmax weights in place; returns nothing: each row sums to 1.
CANCERLLM_SIMD_CLONES void softmax_rows(float* scores, int64_t groups, int64_t count) {
  for (int64_t g = 0; g < groups; ++g) {
    float* row = scores + g * count;
    float top = -INFINITY;
    for (int64_t j = 0; j < count; ++j) top = std::max(top, row[j]);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < count; ++j) {
      row[j] = fast_exp(row[j] - top);
      total += row[j];
    }
    const float inverse = 1.0f / total;
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) row[j] *= inverse;
  }
}

// acc [groups, D] = weights [groups, count] @ the visible slots' values.
CANCERLLM_SIMD_CLONES void weighted_values(const void* values, Float type, const std::vector<int64_t>& visible,
                                             const float* weights, int64_t groups, int64_t D, float* buffer,
                                             float* acc) {
  const int64_t count = static_cast<int64_t>(visible.size());
  std::fill(acc, acc + groups * D, 0.0f);
  for (int64_t j = 0; j < count; ++j) {
    const float* v = cached(values, type, visible[j], D, buffer);
    for (int64_t g = 0; g < groups; ++g) {
      const float w = weights[g * count + j];
      float* acc_g = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc_g[d] += w * v[d];
    }
  }
}

#ifdef CANCERLLM_X86

// Values [d, d + 16) of a cache row as fp32 (lanes outside `mask` zero): bf16 widened exactly.
template <bool Bf16>
CANCERLLM_AVX512 inline __m512 load16(const void* row, int64_t d, __mmask16 mask) {
  if constexpr (Bf16) {
    const __m256i half = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(row) + d);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  } else {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(row) + d);
  }
}

CANCERLLM_AVX512 inline __mmask16 lanes_left(int64_t D, int64_t d) {
  return D - d >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (D - d)) - 1);
}

// Cache rows are read in slot order but from a new head every task, too briefly for the hardware prefetcher to
// lock on: each loop fetches the row kAhead slots ahead in software (perf showed both waiting on their loads).
constexpr int64_t kAhead = 32;

CANCERLLM_AVX512 inline void fetch_row(const void* head, int64_t offset, int64_t bytes) {
  const char* row = static_cast<const char*>(head) + offset;
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(row + line, _MM_HINT_T0);
}

// A cache row of D <= 16 CH values as CH registers of fp32 (lanes past D zero); `masks`: lanes_left per register.
template <int CH, bool Bf16>
CANCERLLM_AVX512 inline void load_row(const char* row, const __mmask16 (&masks)[CH], __m512 (&out)[CH]) {
  for (int c = 0; c < CH; ++c) out[c] = load16<Bf16>(row, 16 * c, masks[c]);
}

// The dot product of query q with a widened key, in one register of partial sums added chunk after chunk.
template <int CH>
CANCERLLM_AVX512 inline __m512 partial_dot(const float* q, const __m512 (&key)[CH], const __mmask16 (&masks)[CH]) {
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c < CH; ++c) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(masks[c], q + 16 * c), key[c], acc);
  return acc;
}

// scores_of with explicit AVX512: four keys at a time, each widened once into registers and then multiplied by
// every query, their partial sums reduced together (one transposing reduction for four dot products). (The
// compiler's version of these loops spent more on setting up each short loop than on the products; widening a key
// again for each query that shares it cost as much as the products.)
template <int CH, bool Bf16>
CANCERLLM_AVX512 void avx512_scores(const void* keys, const std::vector<int64_t>& visible, const float* q,
                                    int64_t groups, int64_t D, float scale, float* scores) {
  const int64_t count = static_cast<int64_t>(visible.size()), row_bytes = D * (Bf16 ? 2 : 4);
  const char* base = static_cast<const char*>(keys);
  __mmask16 masks[CH];
  for (int c = 0; c < CH; ++c) masks[c] = lanes_left(D, 16 * c);
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    for (int r = 0; r < 4 && j + kAhead + r < count; ++r)
      fetch_row(keys, visible[j + kAhead + r] * row_bytes, row_bytes);
    __m512 key[4][CH];
    for (int r = 0; r < 4; ++r) load_row<CH, Bf16>(base + visible[j + r] * row_bytes, masks, key[r]);
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = q + g * D;
      const __m128 sums = sum_lanes4(partial_dot<CH>(qg, key[0], masks), partial_dot<CH>(qg, key[1], masks),
                                     partial_dot<CH>(qg, key[2], masks), partial_dot<CH>(qg, key[3], masks));
      _mm_storeu_ps(scores + g * count + j, _mm_mul_ps(sums, _mm_set1_ps(scale)));
    }
  }
  for (; j < count; ++j) {
    __m512 key[CH];
    load_row<CH, Bf16>(base + visible[j] * row_bytes, masks, key);
    for (int64_t g = 0; g < groups; ++g)
      scores[g * count + j] = sum_lanes(partial_dot<CH>(q + g * D, key, masks)) * scale;
  }
}

// out[G, D] = G queries' weights (rows of `weights`, `count` apart) @ the visible values, G x CH accumulators in
// registers: each value row widened once for the G queries, each output summed over the slots in their order.
template <int CH, int G, bool Bf16>
CANCERLLM_AVX512 void avx512_values_of(const void* values, const std::vector<int64_t>& visible, const float* weights,
                                       int64_t D, float* out) {
  const int64_t count = static_cast<int64_t>(visible.size()), element = Bf16 ? 2 : 4;
  __mmask16 masks[CH];
  for (int c = 0; c < CH; ++c) masks[c] = lanes_left(D, 16 * c);
  __m512 acc[G][CH];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    if (j + kAhead < count) fetch_row(values, visible[j + kAhead] * D * element, D * element);
    __m512 value[CH];
    load_row<CH, Bf16>(static_cast<const char*>(values) + visible[j] * D * element, masks, value);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g * count + j]);
      for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_fmadd_ps(w, value[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) _mm512_mask_storeu_ps(out + g * D + 16 * c, masks[c], acc[g][c]);
}

// weighted_values with explicit AVX512: the queries in tiles of up to 4 (up to 2 past D = 64), as many as keep
// their accumulators and a value row in the 32 registers.
template <int CH, bool Bf16>
CANCERLLM_AVX512 void avx512_values(const void* values, const std::vector<int64_t>& visible, const float* weights,
                                    int64_t groups, int64_t D, float* acc) {
  constexpr int kTile = CH <= 4 ? 4 : 2;
  const int64_t count = static_cast<int64_t>(visible.size());
  for (int64_t g = 0; g < groups;) {
    const int64_t left = groups - g;
    const float* w = weights + g * count;
    float* out = acc + g * D;
    if (left >= kTile) {
      avx512_values_of<CH, kTile, Bf16>(values, visible, w, D, out);
      g += kTile;
    } else if (kTile == 4 && left == 3) {
      avx512_values_of<CH, kTile - 1, Bf16>(values, visible, w, D, out);
      g += 3;
    } else if (left == 2) {
      avx512_values_of<CH, 2, Bf16>(values, visible, w, D, out);
      g += 2;
    } else {
      avx512_values_of<CH, 1, Bf16>(values, visible, w, D, out);
      g += 1;
    }
  }
}

// One task's scores, softmax and weighted values on the AVX512 loops, for heads of up to 16 CH values.
template <int CH, bool Bf16>
CANCERLLM_AVX512 void avx512_attention(const void* keys, const void* values, const std::vector<int64_t>& visible,
                                       const float* q, int64_t groups, int64_t D, float scale, float* weights,
                                       float* acc) {
  avx512_scores<CH, Bf16>(keys, visible, q, groups, D, scale, weights);
  softmax_rows(weights, groups, static_cast<int64_t>(visible.size()));
  avx512_values<CH, Bf16>(values, visible, weights, groups, D, acc);
}

template <bool Bf16>
CANCERLLM_AVX512 bool avx512_attention_of(const void* keys, const void* values, const std::vector<int64_t>& visible,
                                          const float* q, int64_t groups, int64_t D, float scale, float* weights,
                                          float* acc) {
  switch ((D + 15) / 16) {
    case 1: avx512_attention<1, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    case 2: avx512_attention<2, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    case 3: avx512_attention<3, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    case 4: avx512_attention<4, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    case 5: avx512_attention<5, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    case 6: avx512_attention<6, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    case 7: avx512_attention<7, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    case 8: avx512_attention<8, Bf16>(keys, values, visible, q, groups, D, scale, weights, acc); return true;
    default: return false;
  }
}
#endif  // CANCERLLM_X86

// The scores and the weighted values of one task, on the AVX512 loops where `fast`, else the portable ones.
void scores_and_values(const void* keys, const void* values, Float type, const std::vector<int64_t>& visible,
                       const float* q, int64_t groups, int64_t D, float scale, bool fast, float* buffer,
                       float* weights, float* acc) {
  const int64_t count = static_cast<int64_t>(visible.size());
#ifdef CANCERLLM_X86
  if (fast && (type == Float::BF16 ? avx512_attention_of<true>(keys, values, visible, q, groups, D, scale, weights, acc)
                                   : avx512_attention_of<false>(keys, values, visible, q, groups, D, scale, weights,
                                                                acc)))
    return;
#endif
  scores_of(keys, type, visible, q, groups, D, scale, buffer, weights);
  softmax_rows(weights, groups, count);
  weighted_values(values, type, visible, weights, groups, D, buffer, acc);
}

// Row i, KV head h: store the new key (rotated) and value, then attend with the query heads that share them.
void attend(const DecodeAttentionArgs& a, int64_t i, int64_t h, bool fast) {
  const int64_t D = a.D, S = a.S, groups = a.Hq / a.Hkv, pos = a.positions[i];
  const int64_t head_size = S * D, head_at = (i * a.Hkv + h) * head_size;
  std::vector<float> q(groups * D), row(D), buffer(D);
  // The new key and value go to the slot of their position (begin() in cache.py recorded it in slot_pos).
  const int64_t slot = pos % S;
  load_head(a, i, a.Hq + h, true, row.data());
  for (int64_t d = 0; d < D; ++d) store_float(a.k_cache, a.type, head_at + slot * D + d, row[d]);
  load_head(a, i, a.Hq + a.Hkv + h, false, row.data());
  for (int64_t d = 0; d < D; ++d) store_float(a.v_cache, a.type, head_at + slot * D + d, row[d]);
  for (int64_t g = 0; g < groups; ++g) load_head(a, i, h * groups + g, true, q.data() + g * D);

  std::vector<int64_t> visible;
  const int64_t* slot_pos = a.slot_pos + i * S;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t p = slot_pos[s];
    if (p >= 0 && p <= pos && (a.window == 0 || p > pos - a.window)) visible.push_back(s);
  }
  const size_t element = a.type == Float::BF16 ? 2 : 4;
  const char* keys = static_cast<const char*>(a.k_cache) + head_at * element;
  const char* values = static_cast<const char*>(a.v_cache) + head_at * element;
  std::vector<float> weights(groups * visible.size()), acc(groups * D);
  scores_and_values(keys, values, a.type, visible, q.data(), groups, D, a.scale, fast, buffer.data(),
                    weights.data(), acc.data());
  const int64_t out_at = (i * a.Hq + h * groups) * D;
  for (int64_t e = 0; e < groups * D; ++e) store_float(a.out, a.type, out_at + e, acc[e]);
}

}  // namespace

bool has_avx512() { return cpu_has_avx512(); }

void decode_attention(const DecodeAttentionArgs& a, int threads, bool portable) {
  const bool fast = !portable && has_avx512();
  const int64_t tasks = a.n * a.Hkv;
  const bool parallel = threads > 1 && tasks > 1 && a.n * a.Hq * a.S * a.D >= kParallelWork;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t t = 0; t < tasks; ++t) attend(a, t / a.Hkv, t % a.Hkv, fast);
}

}  // namespace cancerllm
