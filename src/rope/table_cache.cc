// Tables per sequence length (see include/ropekit/rope.h): FrequencySeqLen and RopeTableCache.
//
// Only dynamic NTK and LongRoPE frequencies depend on the current sequence length s (transformers'
// `_compute_dynamic_ntk_parameters` and `_compute_longrope_parameters`):
//  - dynamic: base' = base ((factor s / mpe) - (factor - 1))^(R / (R - 2)) for s > mpe, else base;
//  - longrope: long_factor for s > original_max_position_embeddings, else short_factor.
// Every other s gives the same frequencies, so they share one key and one table.
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "ropekit/rope.h"

namespace ropekit {

int64_t FrequencySeqLen(const RopeParams& params, int64_t seq_len) {
  if (seq_len < 0) {
    throw Error("seq_len must be >= 0 (0: not given), got " + std::to_string(seq_len));
  }
  if (params.type == RopeType::kDynamic) {
    return seq_len <= params.max_position_embeddings ? 0 : seq_len;
  }
  if (params.type == RopeType::kLongRope) {
    const int64_t original = params.original_max_position_embeddings > 0
                                 ? params.original_max_position_embeddings
                                 : params.max_position_embeddings;
    return seq_len > original ? original + 1 : 0;
  }
  return 0;
}

struct RopeTableCache::State {
  // Bound on the tables held: dynamic NTK creates one per distinct length above
  // max_position_embeddings.
  static constexpr size_t kMaxTables = 32;
  std::mutex mutex;
  std::map<std::pair<Numerics, int64_t>, std::shared_ptr<const RopeTable>> tables;
};

RopeTableCache::RopeTableCache(RopeParams params)
    : params_(std::move(params)), state_(std::make_unique<State>()) {
  params_.Validate();
}

RopeTableCache::~RopeTableCache() = default;

std::shared_ptr<const RopeTable> RopeTableCache::Get(Numerics numerics, int64_t seq_len) {
  const auto key = std::make_pair(numerics, FrequencySeqLen(params_, seq_len));
  std::lock_guard<std::mutex> lock(state_->mutex);
  auto it = state_->tables.find(key);
  if (it != state_->tables.end()) return it->second;
  auto table = std::make_shared<const RopeTable>(ComputeFrequencies(params_, numerics, key.second));
  if (state_->tables.size() >= State::kMaxTables) state_->tables.clear();
  state_->tables.emplace(key, table);
  return table;
}

}  // namespace ropekit
