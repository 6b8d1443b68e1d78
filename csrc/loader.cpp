#include "loader.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "shuffle.h"

namespace cancerllm {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}
}  // namespace

Dataset::Dataset(const std::vector<std::string>& paths, uint64_t seq_len, bool verify, int64_t pad_id)
    : seq_len_(seq_len), pad_id_(pad_id) {
  if (paths.empty()) throw std::invalid_argument("PackedLoader: no shard paths");
  if (seq_len == 0 || seq_len > kMaxBatchTokens)
    throw std::invalid_argument("PackedLoader: seq_len must be in [1, 2^31 - 1], got " + std::to_string(seq_len));
  bases_.push_back(0);
  for (const auto& path : paths) {
    shards_.push_back(std::make_unique<ShardFile>(path, verify));
    const ShardFile& shard = *shards_.back();
    if (shards_.size() > 1 && shard.has_loss_mask() != sft_)
      throw std::invalid_argument("PackedLoader: mixing SFT shards (with a loss mask) and pretraining shards: " +
                                  paths.front() + ", " + path);
    sft_ = shard.has_loss_mask();
    for (uint64_t i = 0; i < shard.n_docs(); ++i) doc_starts_.push_back(bases_.back() + shard.offsets()[i]);
    bases_.push_back(bases_.back() + shard.n_tokens());
  }
  doc_starts_.push_back(bases_.back());
  if (sft_) {
    pack_sft_rows();
  } else {
    num_samples_ = bases_.back() > 0 ? (bases_.back() - 1) / seq_len_ : 0;
  }
  if (num_samples_ == 0)
    throw std::invalid_argument("PackedLoader: " + std::to_string(bases_.back()) +
                                " tokens do not fill one row of seq_len + 1 = " + std::to_string(seq_len_ + 1));
}

// Greedy, in stream order: whole documents while they fit; a document longer than a row sits alone, truncated.
void Dataset::pack_sft_rows() {
  const uint64_t n_docs = doc_starts_.size() - 1, capacity = seq_len_ + 1;
  uint64_t used = 0;
  rows_.push_back(0);
  for (uint64_t d = 0; d < n_docs; ++d) {
    uint64_t len = doc_starts_[d + 1] - doc_starts_[d];
    truncated_ += len > capacity;
    len = std::min(len, capacity);
    if (used && used + len > capacity) {
      rows_.push_back(d);
      used = 0;
    }
    used += len;
  }
  rows_.push_back(n_docs);
  num_samples_ = rows_.size() - 1;
}

void RowView::put(const ShardFile& shard, uint64_t a, uint64_t b, uint64_t at) const {
  const uint64_t n_inputs = std::min(b - a, seq_len - std::min(at, seq_len));  // row indices below seq_len
  if (n_inputs) shard.copy_tokens(a, a + n_inputs, tokens + at);
  const uint64_t skip = at == 0;  // row index 0 is no one's target
  if (b - a > skip) {
    shard.copy_tokens(a + skip, b, targets + at + skip - 1);
    shard.copy_mask(a + skip, b, mask + at + skip - 1);
  }
}

void RowView::pad(uint64_t at, int64_t pad_id) const {
  if (at < seq_len) std::fill(tokens + at, tokens + seq_len, pad_id);
  const uint64_t first_target = std::max<uint64_t>(at, 1) - 1;
  std::fill(targets + first_target, targets + seq_len, pad_id);
  std::fill(mask + first_target, mask + seq_len, uint8_t{0});
}

void Dataset::gather(uint64_t lo, uint64_t hi, const RowView& row, uint64_t at) const {
  size_t i = std::upper_bound(bases_.begin(), bases_.end(), lo) - bases_.begin() - 1;
  while (lo < hi) {
    uint64_t a = lo - bases_[i], b = std::min(hi, bases_[i + 1]) - bases_[i];
    row.put(*shards_[i], a, b, at);
    at += b - a;
    lo = bases_[i] + b;
    ++i;
  }
}

void Dataset::fill_row(uint64_t sample, const RowView& row, std::vector<uint64_t>& starts) const {
  const uint64_t n = seq_len_ + 1;
  if (!sft_) {
    uint64_t lo = sample * seq_len_;
    gather(lo, lo + n, row, 0);
    auto d = std::lower_bound(doc_starts_.begin(), doc_starts_.end() - 1, lo);
    for (; d != doc_starts_.end() - 1 && *d < lo + n; ++d) starts.push_back(*d - lo);
    return;
  }
  uint64_t at = 0;
  for (uint64_t d = rows_[sample]; d < rows_[sample + 1]; ++d) {
    uint64_t a = doc_starts_[d], b = std::min(doc_starts_[d + 1], a + n);
    gather(a, b, row, at);
    starts.push_back(at);
    at += b - a;
  }
  if (at < n) {
    row.pad(at, pad_id_);
    starts.push_back(at);
  }
}

std::unique_ptr<Batch> BatchPool::take() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return std::make_unique<Batch>();
  auto batch = std::move(free_.back());
  free_.pop_back();
  return batch;
}

void BatchPool::give(std::unique_ptr<Batch> batch) {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.size() < capacity_) free_.push_back(std::move(batch));
}

Loader::Loader(const std::vector<std::string>& paths, uint64_t seq_len, uint64_t batch_size, uint64_t rank,
               uint64_t world_size, uint64_t seed, bool verify, int64_t pad_id, int num_threads, int prefetch)
    : dataset_(paths, seq_len, verify, pad_id),
      batch_size_(batch_size), rank_(rank), world_size_(world_size), seed_(seed),
      num_threads_(num_threads), prefetch_(prefetch),
      pool_(std::make_shared<BatchPool>(static_cast<size_t>(num_threads) + prefetch + 2)) {
  if (batch_size == 0 || world_size == 0 || rank >= world_size)
    throw std::invalid_argument("PackedLoader: need batch_size >= 1 and 0 <= rank < world_size");
  // A wrapped product would size the batch buffers too small and the rows would be written past their end.
  uint64_t batch_tokens = 0, samples_per_step = 0;
  if (__builtin_mul_overflow(batch_size, seq_len, &batch_tokens) || batch_tokens > kMaxBatchTokens)
    throw std::invalid_argument("PackedLoader: batch_size * seq_len (" + std::to_string(batch_size) + " * " +
                                std::to_string(seq_len) + ") exceeds 2^31 - 1 tokens: cu_seqlens are int32");
  if (__builtin_mul_overflow(batch_size, world_size, &samples_per_step))
    throw std::invalid_argument("PackedLoader: batch_size * world_size (" + std::to_string(batch_size) + " * " +
                                std::to_string(world_size) + ") overflows 64 bits");
  if (num_threads < 1 || prefetch < 1)
    throw std::invalid_argument("PackedLoader: num_threads and prefetch must be at least 1");
}

Loader::~Loader() { stop(); }

// Row by row, in runs the compiler vectorises: tokens and targets come straight from the shards, the loss mask
// is the targets' bits cleared where a document begins, and positions count up from each segment start.
void Loader::make_batch(uint64_t g0, uint64_t step, Batch& batch) const {
  const uint64_t B = batch_size_, T = dataset_.seq_len(), S = dataset_.num_samples();
  const uint64_t first = g0 + (step * world_size_ + rank_) * B;
  batch.tokens.resize(B * T);
  batch.targets.resize(B * T);
  batch.positions.resize(B * T);
  batch.loss_mask.resize(B * T);
  batch.cu_seqlens.clear();
  std::vector<uint64_t> starts;
  for (uint64_t b = 0; b < B; ++b) {
    const uint64_t g = first + b, at = b * T;
    uint8_t* mask = batch.loss_mask.data() + at;
    starts.clear();
    dataset_.fill_row(Permutation(S, seed_, g / S)(g % S),
                      RowView{batch.tokens.data() + at, batch.targets.data() + at, mask, T}, starts);
    int64_t* positions = batch.positions.data() + at;
    uint64_t segment = 0;  // every row starts a segment, whether or not a document starts there
    for (uint64_t s : starts) {
      if (s == segment) continue;  // the row start, or an empty document
      mask[s - 1] = 0;             // target s - 1 is the first token of the next document
      if (s == T) break;
      batch.cu_seqlens.push_back(static_cast<int32_t>(at + segment));
      std::iota(positions + segment, positions + s, int64_t{0});
      segment = s;
    }
    batch.cu_seqlens.push_back(static_cast<int32_t>(at + segment));
    std::iota(positions + segment, positions + T, int64_t{0});
  }
  batch.cu_seqlens.push_back(static_cast<int32_t>(B * T));
}

void Loader::start(uint64_t g0) {
  stop();
  std::lock_guard<std::mutex> lock(mu_);
  g0_ = g0;
  next_to_make_ = next_to_take_ = 0;
  filed_ = 0;
  ready_.clear();
  error_ = nullptr;
  stopping_ = false;
  for (int i = 0; i < num_threads_; ++i) threads_.emplace_back(&Loader::work, this);
}

void Loader::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  space_cv_.notify_all();
  ready_cv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

// Each worker claims the next step number, builds it outside the lock and files it under its number, so the
// order of batches does not depend on which thread finishes first.
void Loader::work() {
  for (;;) {
    uint64_t step;
    {
      std::unique_lock<std::mutex> lock(mu_);
      space_cv_.wait(lock, [&] { return stopping_ || next_to_make_ < next_to_take_ + prefetch_; });
      if (stopping_) return;
      step = next_to_make_++;
    }
    auto batch = pool_->take();
    try {
      make_batch(g0_, step, *batch);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::current_exception();
      ready_cv_.notify_all();
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    ready_[step] = std::move(batch);
    filed_.fetch_add(1, std::memory_order_release);
    ready_cv_.notify_all();
  }
}

// A batch that is microseconds away is not worth sleeping for: a futex sleep and wake-up (an inter-processor
// interrupt on a VM) costs about a third of building a 32k-token batch. So spin briefly on the count of filed
// batches first, then wait on the condition variable as usual; but only while a core is left over for the
// spinning thread, else it would slow the workers down.
void Loader::spin_until_filed() const {
  if (static_cast<unsigned>(num_threads_) >= std::thread::hardware_concurrency()) return;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
  while (filed_.load(std::memory_order_acquire) <= next_to_take_ && std::chrono::steady_clock::now() < deadline)
    cpu_relax();
}

std::unique_ptr<Batch> Loader::next() {
  spin_until_filed();
  std::unique_lock<std::mutex> lock(mu_);
  if (threads_.empty()) throw std::logic_error("PackedLoader: next() after stop()");
  ready_cv_.wait(lock, [&] { return error_ || ready_.count(next_to_take_); });
  if (error_) std::rethrow_exception(error_);
  auto node = ready_.extract(next_to_take_++);
  space_cv_.notify_one();  // one slot freed: one worker can use it
  return std::move(node.mapped());
}

}  // namespace cancerllm
