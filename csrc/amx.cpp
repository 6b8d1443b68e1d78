// AMX support shared by the kernels (amx.h).
#include "amx.h"


#ifdef CANCERLLM_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace cancerllm {

bool has_amx() {
#ifdef CANCERLLM_X86
  // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; then Linux must grant this process the tiles' register
  // state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), once for all its threads.
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22)) || !(edx & (1u << 24))) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

std::vector<uint16_t> pack_by_pairs(const uint16_t* b, int64_t N, int64_t K, int64_t pairs, int64_t blocks) {
  std::vector<uint16_t> packed(blocks * pairs * 32, 0);
  for (int64_t n = 0; n < N; ++n) {
    uint16_t* block = &packed[n / 16 * pairs * 32 + n % 16 * 2];
    for (int64_t k = 0; k < K; ++k) block[k / 2 * 32 + k % 2] = b[n * K + k];
  }
  return packed;
}

}  // namespace cancerllm
