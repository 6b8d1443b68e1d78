// What the AMX kernels (score_matmul.cpp, gemv.cpp) share: the run-time check and Linux's permission, the target
// attribute, the tile configuration's layout, and the B operand's packing by pairs of K.
#pragma once

#include <cstdint>
#include <vector>

#include "avx512.h"

#ifdef CANCERLLM_X86
#define CANCERLLM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#endif

namespace cancerllm {

// Whether this CPU has AMX-BF16 and this process may use its tiles (asked of Linux on the first call).
bool has_amx();

struct TileConfig {   // the LDTILECFG operand: palette 1, then each tile register's bytes per row and rows
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// B [N, K] bf16 as `tdpbf16ps` reads its B operand: for each block of 16 rows of B and each pair p of K,
// 16 x (B[n, 2p], B[n, 2p + 1]) = one tile row of 64 bytes. `pairs` (>= (K + 1) / 2) pairs per block and `blocks`
// (>= the blocks N fills) blocks; zero past N and past K.
std::vector<uint16_t> pack_by_pairs(const uint16_t* b, int64_t N, int64_t K, int64_t pairs, int64_t blocks);

}  // namespace cancerllm
