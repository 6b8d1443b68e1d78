// A memory-mapped, validated token shard (format: csrc/README.md, cancerllm/data/shards.py).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace cancerllm {

// A file that is not what its header promises. The message names the file; Python sees a ValueError.
struct ShardError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr uint32_t kFlagLossMask = 1;

uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0);

class ShardFile {
 public:
  // Maps `path` and validates the header, the file length and the document offsets; with `verify` also the
  // payload crc32, token ids below vocab_size and a 0/1 loss mask. Throws ShardError, never reads out of bounds.
  ShardFile(const std::string& path, bool verify);
  ~ShardFile();
  ShardFile(const ShardFile&) = delete;
  ShardFile& operator=(const ShardFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t n_tokens() const { return n_tokens_; }
  uint64_t n_docs() const { return offsets_.size() - 1; }
  uint32_t vocab_size() const { return vocab_size_; }
  uint32_t token_size() const { return token_size_; }
  bool has_loss_mask() const { return mask_ != nullptr; }
  // offsets()[i] is the first token of document i; offsets()[n_docs] == n_tokens.
  const std::vector<uint64_t>& offsets() const { return offsets_; }

  // Tokens [lo, hi) widened to int64, and their loss-mask bits (1 when the shard has no mask).
  void copy_tokens(uint64_t lo, uint64_t hi, int64_t* out) const;
  void copy_mask(uint64_t lo, uint64_t hi, uint8_t* out) const;

 private:
  [[noreturn]] void fail(const std::string& what) const;
  void validate(bool verify);

  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  uint32_t token_size_ = 0, vocab_size_ = 0, crc_ = 0;
  uint64_t n_tokens_ = 0;
  const uint8_t* tokens_ = nullptr;
  const uint8_t* mask_ = nullptr;
  std::vector<uint64_t> offsets_;
};

}  // namespace cancerllm
