// Packing shards into training rows, and the prefetching loader. The contract (samples, segments, loss, order)
// is spelled out in cancerllm/data/loader.py; the pure-Python backend there must produce identical batches.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "shard.h"

namespace cancerllm {

// The most tokens a batch may hold: cu_seqlens are int32 offsets over the batch's batch_size * seq_len tokens.
constexpr uint64_t kMaxBatchTokens = (uint64_t{1} << 31) - 1;

struct Batch {
  std::vector<int64_t> tokens, targets, positions;  // [batch, seq_len]
  std::vector<uint8_t> loss_mask;                   // [batch, seq_len], 0/1
  std::vector<int32_t> cu_seqlens;                  // segment starts over batch * seq_len, then batch * seq_len
};

// Recycles batch buffers once Python lets go of them: a fresh multi-megabyte allocation per batch would cost a
// page fault every 4 KiB. Shared by the loader and the arrays it hands out, so either may go first.
class BatchPool {
 public:
  explicit BatchPool(size_t capacity) : capacity_(capacity) {}
  std::unique_ptr<Batch> take();
  void give(std::unique_ptr<Batch> batch);

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Batch>> free_;
  size_t capacity_;
};

// Where one sample (a row of seq_len + 1 tokens) lands in a batch: row index i is tokens[i] when i < seq_len
// and, as a prediction target, targets[i - 1] with loss bit mask[i - 1] when i >= 1. Writing both straight from
// the shard saves a pass through an intermediate row.
struct RowView {
  int64_t* tokens;
  int64_t* targets;
  uint8_t* mask;
  uint64_t seq_len;

  // Stream tokens [a, b) of `shard` at row indices [at, at + b - a).
  void put(const ShardFile& shard, uint64_t a, uint64_t b, uint64_t at) const;
  // Row indices [at, seq_len + 1) hold `pad_id` and carry no loss.
  void pad(uint64_t at, int64_t pad_id) const;
};

// The shards as one token stream cut into samples: rows of seq_len + 1 tokens.
class Dataset {
 public:
  Dataset(const std::vector<std::string>& paths, uint64_t seq_len, bool verify, int64_t pad_id);

  bool sft() const { return sft_; }
  uint64_t num_samples() const { return num_samples_; }
  uint64_t truncated_examples() const { return truncated_; }
  uint64_t seq_len() const { return seq_len_; }

  // One sample into `row`, loss bits as the shards have them; appends to `starts` the row indices where a
  // document (or the padding) begins, in increasing order.
  void fill_row(uint64_t sample, const RowView& row, std::vector<uint64_t>& starts) const;

 private:
  void gather(uint64_t lo, uint64_t hi, const RowView& row, uint64_t at) const;
  void pack_sft_rows();

  std::vector<std::unique_ptr<ShardFile>> shards_;
  std::vector<uint64_t> bases_;       // first stream position of each shard, then the stream length
  std::vector<uint64_t> doc_starts_;  // stream position of each document, then the stream length
  std::vector<uint64_t> rows_;        // SFT: first document of each row, then the number of documents
  uint64_t seq_len_, num_samples_ = 0, truncated_ = 0;
  int64_t pad_id_;
  bool sft_ = false;
};

// Builds the batches of one rank ahead of time on background threads. Step k of rank r holds the global samples
// g0 + (k * world_size + r) * batch_size + [0, batch_size); global sample g is in epoch g / num_samples.
class Loader {
 public:
  Loader(const std::vector<std::string>& paths, uint64_t seq_len, uint64_t batch_size, uint64_t rank,
         uint64_t world_size, uint64_t seed, bool verify, int64_t pad_id, int num_threads, int prefetch);
  ~Loader();

  const Dataset& dataset() const { return dataset_; }
  const std::shared_ptr<BatchPool>& pool() const { return pool_; }
  // (Re)starts the pipeline so that the next batch is step 0 from global sample index g0.
  void start(uint64_t g0);
  // Blocks until the next batch is built; rethrows a worker's exception.
  std::unique_ptr<Batch> next();
  void stop();
  // Builds step `step` from g0 on the calling thread.
  void make_batch(uint64_t g0, uint64_t step, Batch& batch) const;

 private:
  void work();
  void spin_until_filed() const;
  static constexpr int kSpinMicroseconds = 50;

  Dataset dataset_;
  uint64_t batch_size_, rank_, world_size_, seed_;
  int num_threads_, prefetch_;
  std::shared_ptr<BatchPool> pool_;

  std::mutex mu_;
  std::condition_variable ready_cv_, space_cv_;
  std::vector<std::thread> threads_;
  std::map<uint64_t, std::unique_ptr<Batch>> ready_;
  std::exception_ptr error_;
  std::atomic<uint64_t> filed_{0};  // batches filed since start(), read by next() without the lock
  uint64_t g0_ = 0, next_to_make_ = 0, next_to_take_ = 0;
  bool stopping_ = false;
};

}  // namespace cancerllm
