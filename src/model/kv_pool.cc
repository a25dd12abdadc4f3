// KV caches of the model (ropekit/model.h): KVCache's contiguous storage and KvPagePool's pages.
//
// Dimension legend: L = layers, Hkv = kv heads, D = head_dim, P = page_size, C = capacity
// (tokens one cache can hold). Contiguous k / v: [L, C, Hkv*D]; pool k / v: [L, pages, P, Hkv*D].
// Position t of a paged cache lives at row t % P of page block_table[t / P] in every layer
// (vLLM's block table, Kwon et al. 2023, arXiv:2309.06180).
#include <string>

#include "ropekit/model.h"

namespace ropekit {
namespace {

constexpr int64_t kMaxPageSize = 65536;

// Floats of one k or v tensor of L * rows * row, checked in 128 bits against 2^34 (64 GiB).
size_t TensorFloats(int layers, int64_t rows, int64_t row, const std::string& what) {
  const unsigned __int128 floats = static_cast<unsigned __int128>(layers) *
                                   static_cast<unsigned __int128>(rows) *
                                   static_cast<unsigned __int128>(row);
  if (floats > (static_cast<unsigned __int128>(1) << 34)) {
    throw Error(what +
                " for this model needs more than 2^34 floats per tensor (64 GiB); use fewer "
                "tokens");
  }
  return static_cast<size_t>(floats);
}

}  // namespace

KvPagePool::KvPagePool(const ModelConfig& config, int64_t num_pages, int64_t page_size) {
  const ModelConfig c = config.Resolved();
  if (page_size < 1 || page_size > kMaxPageSize) {
    throw Error("KV page pool: page_size " + std::to_string(page_size) + " is outside [1, 65536]");
  }
  if (num_pages < 1 || num_pages > (int64_t{1} << 31) - 1) {
    throw Error("KV page pool: num_pages " + std::to_string(num_pages) +
                " is outside [1, 2^31 - 1]");
  }
  num_pages_ = num_pages;
  page_size_ = page_size;
  row_ = int64_t{c.num_kv_heads} * c.head_dim;
  layer_stride_ = num_pages * page_size * row_;
  const size_t floats = TensorFloats(c.num_layers, num_pages * page_size, row_,
                                     "a KV page pool of " + std::to_string(num_pages) +
                                         " pages of " + std::to_string(page_size) + " tokens");
  k_.assign(floats, 0.0f);
  v_.assign(floats, 0.0f);
  // Drawn from the back: page 0 first.
  free_.resize(static_cast<size_t>(num_pages));
  for (int64_t i = 0; i < num_pages; ++i) free_[i] = static_cast<int32_t>(num_pages - 1 - i);
}

KvPagePool::~KvPagePool() = default;

int64_t KvPagePool::PagesFor(int64_t tokens) const {
  return tokens <= 0 ? 0 : (tokens + page_size_ - 1) / page_size_;
}

int64_t KvPagePool::bytes() const {
  return static_cast<int64_t>((k_.size() + v_.size()) * sizeof(float));
}

KVCache::KVCache(const ModelConfig& config, int64_t capacity) {
  const ModelConfig c = config.Resolved();
  if (capacity < 1 || capacity > kMaxPosition) {
    throw Error("KV cache capacity " + std::to_string(capacity) + " must be in [1, 2^31 - 1]");
  }
  capacity_ = capacity;
  row_ = int64_t{c.num_kv_heads} * c.head_dim;
  layers_ = c.num_layers;
  k_.assign(TensorFloats(c.num_layers, capacity, row_,
                         "KV cache of " + std::to_string(capacity) + " positions"),
            0.0f);
  v_.assign(k_.size(), 0.0f);
}

KVCache::KVCache(KvPagePool& pool, int64_t capacity) {
  if (capacity < 1 || capacity > kMaxPosition) {
    throw Error("KV cache capacity " + std::to_string(capacity) + " must be in [1, 2^31 - 1]");
  }
  const int64_t pages = pool.PagesFor(capacity);
  if (pages > pool.available_pages()) {
    throw Error("KV page pool exhausted: a cache of " + std::to_string(capacity) +
                " tokens needs " + std::to_string(pages) + " pages of " +
                std::to_string(pool.page_size()) + " tokens; " +
                std::to_string(pool.available_pages()) + " of " + std::to_string(pool.num_pages()) +
                " pages are free");
  }
  pool.reserved_ += pages;
  pool_ = &pool;
  reserved_ = pages;
  capacity_ = capacity;
  row_ = pool.row_;
  layers_ = static_cast<int>(static_cast<int64_t>(pool.k_.size()) / pool.layer_stride_);
  block_table_.reserve(static_cast<size_t>(pages));
}

KVCache::~KVCache() {
  Clear();
  if (pool_ != nullptr) pool_->reserved_ -= reserved_;
}

void KVCache::Clear() {
  size_ = 0;
  if (pool_ == nullptr) return;
  // Returned in reverse, so the next cache draws them in the same order.
  for (auto it = block_table_.rbegin(); it != block_table_.rend(); ++it)
    pool_->free_.push_back(*it);
  block_table_.clear();
}

void KVCache::Cover(int64_t tokens) {
  if (pool_ == nullptr) return;
  const int64_t pages = pool_->PagesFor(tokens);
  if (pages > reserved_) {  // callers check tokens <= capacity first
    throw Error("KV cache: " + std::to_string(tokens) + " tokens exceed its capacity " +
                std::to_string(capacity_));
  }
  while (static_cast<int64_t>(block_table_.size()) < pages) {
    // Cannot be empty: every live cache's drawn pages are within its reservation.
    block_table_.push_back(pool_->free_.back());
    pool_->free_.pop_back();
  }
}

float* KVCache::KeyRow(int l, int64_t pos) {
  if (pool_ == nullptr) return k_.data() + (l * capacity_ + pos) * row_;
  const int64_t P = pool_->page_size_;
  const int64_t slot = int64_t{block_table_[pos / P]} * P + pos % P;
  return pool_->k_.data() + l * pool_->layer_stride_ + slot * row_;
}

float* KVCache::ValueRow(int l, int64_t pos) {
  if (pool_ == nullptr) return v_.data() + (l * capacity_ + pos) * row_;
  const int64_t P = pool_->page_size_;
  const int64_t slot = int64_t{block_table_[pos / P]} * P + pos % P;
  return pool_->v_.data() + l * pool_->layer_stride_ + slot * row_;
}

bool KVCache::Fits(const ModelConfig& config) const {
  return layers_ == config.num_layers && row_ == int64_t{config.num_kv_heads} * config.head_dim;
}

}  // namespace ropekit
