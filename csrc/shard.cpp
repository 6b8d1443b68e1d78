#include "shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

namespace cancerllm {

namespace {

constexpr char kMagic[8] = {'C', 'L', 'L', 'M', 'S', 'H', 'R', 'D'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderSize = 64;

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

template <typename T>
T load(const uint8_t* p) {  // unaligned little-endian read without aliasing tricks
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Widening the shard's tokens into the batch is most of a batch's cost. A portable build targets baseline
// x86-64 (SSE2); an AVX2 clone, chosen once at load time, widens ~1.4x faster where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__)
#define CANCERLLM_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CANCERLLM_VECTOR_CLONES
#endif

CANCERLLM_VECTOR_CLONES void widen_u16(const uint8_t* src, uint64_t n, int64_t* out) {
  for (uint64_t i = 0; i < n; ++i) out[i] = load<uint16_t>(src + 2 * i);
}

CANCERLLM_VECTOR_CLONES void widen_u32(const uint8_t* src, uint64_t n, int64_t* out) {
  for (uint64_t i = 0; i < n; ++i) out[i] = load<uint32_t>(src + 4 * i);
}

CANCERLLM_VECTOR_CLONES void mask_bits(const uint8_t* src, uint64_t n, uint8_t* out) {
  for (uint64_t i = 0; i < n; ++i) out[i] = src[i] != 0;
}

}  // namespace

// zlib's crc32 (reflected 0xEDB88320), so Python's zlib.crc32 writes what this reads.
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

ShardFile::ShardFile(const std::string& path, bool verify) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ >= kHeaderSize) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(std::string("mmap failed: ") + std::strerror(errno));
    }
    data_ = static_cast<const uint8_t*>(p);
    ::madvise(p, size_, MADV_RANDOM);  // rows are read in shuffled order
  }
  ::close(fd);
  try {
    validate(verify);
  } catch (...) {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
    throw;
  }
}

ShardFile::~ShardFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

void ShardFile::fail(const std::string& what) const { throw ShardError(path_ + ": " + what); }

void ShardFile::validate(bool verify) {
  if (size_ < kHeaderSize)
    fail("truncated: " + std::to_string(size_) + " bytes is shorter than the 64-byte header");
  if (std::memcmp(data_, kMagic, 8) != 0) fail("not a cancerllm shard (bad magic)");
  uint32_t version = load<uint32_t>(data_ + 8), flags = load<uint32_t>(data_ + 12);
  token_size_ = load<uint32_t>(data_ + 16);
  vocab_size_ = load<uint32_t>(data_ + 20);
  n_tokens_ = load<uint64_t>(data_ + 24);
  uint64_t n_docs = load<uint64_t>(data_ + 32);
  crc_ = load<uint32_t>(data_ + 40);
  if (version != kVersion) fail("shard format version " + std::to_string(version) + ", this reader knows 1");
  bool reserved_zero = true;
  for (size_t i = 44; i < kHeaderSize; ++i) reserved_zero &= data_[i] == 0;
  if ((flags & ~kFlagLossMask) != 0 || !reserved_zero) fail("unknown header flags or non-zero reserved bytes");
  if (token_size_ != 2 && token_size_ != 4) fail("token size " + std::to_string(token_size_) + ", expected 2 or 4");
  if (vocab_size_ == 0 || (token_size_ == 2 && vocab_size_ > (1u << 16)))
    fail("vocab_size " + std::to_string(vocab_size_) + " does not match the token size");
  // Bound the counts by the file size before any multiplication, so nothing below can overflow.
  if (n_docs == 0 || n_docs > size_ || n_tokens_ > size_)
    fail("header claims " + std::to_string(n_tokens_) + " tokens in " + std::to_string(n_docs) +
         " documents, impossible for a " + std::to_string(size_) + "-byte file");
  uint64_t offsets_start = kHeaderSize + (n_tokens_ * token_size_ + 7) / 8 * 8;
  uint64_t mask_start = offsets_start + (n_docs + 1) * 8;
  uint64_t expected = mask_start + ((flags & kFlagLossMask) ? n_tokens_ : 0);
  if (expected != size_)
    fail("file is " + std::to_string(size_) + " bytes but its header describes " + std::to_string(expected) +
         (size_ < expected ? " (truncated)" : " (trailing data)"));
  tokens_ = data_ + kHeaderSize;
  mask_ = (flags & kFlagLossMask) ? data_ + mask_start : nullptr;
  offsets_.resize(n_docs + 1);
  std::memcpy(offsets_.data(), data_ + offsets_start, (n_docs + 1) * 8);
  if (offsets_.front() != 0 || offsets_.back() != n_tokens_)
    fail("document offsets must run from 0 to " + std::to_string(n_tokens_));
  for (uint64_t i = 0; i < n_docs; ++i)
    if (offsets_[i + 1] <= offsets_[i])
      fail("document offsets not strictly increasing at document " + std::to_string(i));
  if (!verify) return;
  uint32_t actual = crc32(data_ + kHeaderSize, size_ - kHeaderSize);
  if (actual != crc_) fail("checksum mismatch: the file is corrupt");
  for (uint64_t i = 0; i < n_tokens_; ++i) {
    uint32_t t = token_size_ == 2 ? load<uint16_t>(tokens_ + 2 * i) : load<uint32_t>(tokens_ + 4 * i);
    if (t >= vocab_size_) fail("token id " + std::to_string(t) + " is not below vocab_size");
  }
  for (uint64_t i = 0; mask_ && i < n_tokens_; ++i)
    if (mask_[i] > 1) fail("loss mask holds values other than 0 and 1");
}

void ShardFile::copy_tokens(uint64_t lo, uint64_t hi, int64_t* out) const {
  if (token_size_ == 2) {
    widen_u16(tokens_ + 2 * lo, hi - lo, out);
  } else {
    widen_u32(tokens_ + 4 * lo, hi - lo, out);
  }
}

void ShardFile::copy_mask(uint64_t lo, uint64_t hi, uint8_t* out) const {
  if (mask_) {
    mask_bits(mask_ + lo, hi - lo, out);
  } else {  // a pretraining shard: every token carries loss
    std::fill(out, out + (hi - lo), uint8_t{1});
  }
}

}  // namespace cancerllm
