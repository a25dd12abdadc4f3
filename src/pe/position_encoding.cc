// PositionEncoding: validation and the three hook points (embeddings, q/k, logits).
//
// Dimension legend: T = tokens, H = heads, d = embedding width, K = keys in one logit row.
//
// SIMD: the hooks are O(T * d) (embeddings) or O(K) per query row (logits), next to the
// O(T * d * d) projections and O(T * K * D) attention products of the model that calls them.
// They are written as plain loops over contiguous floats that the compiler auto-vectorises;
// a Highway kernel would not change the model's run time measurably. Each output is formed in
// double and rounded once to float32, so these loops are their own scalar reference (the tests
// check them against long double closed forms and finite differences).
#include "ropekit/position_encoding.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace ropekit {
namespace {

// Rows precomputed for the sinusoidal table at most (64 MiB of float32); positions beyond are
// computed on the fly with identical values.
constexpr int64_t kMaxSinusoidalCacheFloats = int64_t{1} << 24;
// T5 buckets are tabulated for |key - query| <= this bound, computed on the fly beyond.
constexpr int64_t kMaxBucketTable = int64_t{1} << 16;
constexpr int kMaxDim = 1 << 20;
constexpr int kMaxHeads = 1 << 20;

std::string Str(int64_t v) { return std::to_string(v); }

// grad_params[b, head] += sums[b] for every bucket a key fell in: one float addition each.
void AddBucketSums(const std::vector<double>& sums, const std::vector<char>& touched, int num_heads,
                   int head, std::span<float> grad_params) {
  for (size_t b = 0; b < sums.size(); ++b) {
    if (!touched[b]) continue;
    float& g = grad_params[b * static_cast<size_t>(num_heads) + head];
    g = static_cast<float>(static_cast<double>(g) + sums[b]);
  }
}

void CheckPosition(int64_t position, const char* what) {
  if (position < 0 || position > kMaxPosition) {
    throw Error(std::string(what) + ": position " + Str(position) +
                " is out of range (accepted: 0 to " + Str(kMaxPosition) + ")");
  }
}

// Calls fn(j, bucket) for keys j = 0 .. num_keys - 1 in ascending order, where key j has the
// relative position r0 + j. `table` holds the buckets of r in [-bound, bound]; when bound reaches
// max_distance the buckets beyond it are the saturated end buckets, one constant per side.
template <typename Fn>
void ForEachKeyBucket(const PositionEncoding& pe, const std::vector<int32_t>& table, int64_t r0,
                      int64_t num_keys, Fn&& fn) {
  const int64_t bound = static_cast<int64_t>(table.size() / 2);
  const bool saturated = bound >= pe.spec().max_distance;
  const int64_t lo = std::clamp<int64_t>(-bound - r0, 0, num_keys);
  const int64_t hi = std::clamp<int64_t>(bound - r0 + 1, lo, num_keys);
  if (saturated) {
    const int far_before = pe.Bucket(-bound - 1);
    for (int64_t j = 0; j < lo; ++j) fn(j, far_before);
  } else {
    for (int64_t j = 0; j < lo; ++j) fn(j, pe.Bucket(r0 + j));
  }
  const int64_t offset = r0 + bound;  // table[offset + j] is key j's bucket for j in [lo, hi)
  for (int64_t j = lo; j < hi; ++j) fn(j, table[offset + j]);
  if (saturated) {
    const int far_after = pe.Bucket(bound + 1);
    for (int64_t j = hi; j < num_keys; ++j) fn(j, far_after);
  } else {
    for (int64_t j = hi; j < num_keys; ++j) fn(j, pe.Bucket(r0 + j));
  }
}

}  // namespace

void PositionEncodingSpec::Validate() const {
  if (static_cast<int>(kind) < 0 || kind >= PositionEncodingKind::kSentinel) {
    throw Error("kind: invalid position encoding kind");
  }
  if (static_cast<int>(embedding_scale) < 0 || embedding_scale >= EmbeddingScale::kSentinel) {
    throw Error("embedding_scale: invalid value");
  }
  if (static_cast<int>(out_of_range) < 0 || out_of_range >= OutOfRange::kSentinel) {
    throw Error("out_of_range: invalid value");
  }
  const std::string name(PositionEncodingKindName(kind));
  if (!ActsOnEmbeddings(kind) && embedding_scale != EmbeddingScale::kNone) {
    throw Error("embedding_scale: must be none for kind " + name +
                " (only sinusoidal and learned act on embeddings)");
  }
  if (ActsOnEmbeddings(kind) && (dim < 1 || dim > kMaxDim)) {
    throw Error("dim: " + Str(dim) + " is out of range for kind " + name + " (accepted: 1 to " +
                Str(kMaxDim) + ")");
  }
  if (ActsOnLogits(kind) && (num_heads < 1 || num_heads > kMaxHeads)) {
    throw Error("num_heads: " + Str(num_heads) + " is out of range for kind " + name +
                " (accepted: 1 to " + Str(kMaxHeads) + ")");
  }
  if (kind == PositionEncodingKind::kLearned || kind == PositionEncodingKind::kT5) {
    if (!(init_std >= 0.0) || !std::isfinite(init_std)) {
      throw Error("init_std: " + std::to_string(init_std) + " must be finite and >= 0");
    }
  }
  switch (kind) {
    case PositionEncodingKind::kSinusoidal:
      if (!(sinusoidal_base > 1.0) || !std::isfinite(sinusoidal_base)) {
        throw Error("sinusoidal_base: " + std::to_string(sinusoidal_base) +
                    " must be finite and > 1");
      }
      if (max_positions < 0 || max_positions > kMaxPosition + 1) {
        throw Error("max_positions: " + Str(max_positions) +
                    " is out of range for kind sinusoidal (accepted: 0 to " +
                    Str(kMaxPosition + 1) + ")");
      }
      break;
    case PositionEncodingKind::kLearned:
      if (max_positions < 1 || max_positions > kMaxPosition + 1 ||
          max_positions > (int64_t{1} << 40) / dim) {
        throw Error("max_positions: " + Str(max_positions) +
                    " is out of range for kind learned (accepted: 1 to " +
                    Str(std::min<int64_t>(kMaxPosition + 1, (int64_t{1} << 40) / dim)) +
                    " for dim " + Str(dim) + ")");
      }
      break;
    case PositionEncodingKind::kRope:
      if (static_cast<int>(rope_layout) < 0 || rope_layout >= Layout::kSentinel) {
        throw Error("rope_layout: invalid value");
      }
      if (static_cast<int>(rope_numerics) < 0 || rope_numerics >= Numerics::kSentinel) {
        throw Error("rope_numerics: invalid value");
      }
      rope.Validate();
      break;
    case PositionEncodingKind::kT5:
      // Checks num_buckets and max_distance with T5RelativeBucket's messages.
      T5RelativeBucket(0, bidirectional, num_buckets, max_distance);
      break;
    default:
      break;
  }
}

PositionEncoding::PositionEncoding(const PositionEncodingSpec& spec) : spec_(spec) {
  spec_.Validate();
  if (spec_.embedding_scale == EmbeddingScale::kSqrtDim) {
    embedding_scale_ = std::sqrt(static_cast<double>(spec_.dim));
  }
  switch (spec_.kind) {
    case PositionEncodingKind::kAlibi:
      slopes_ = AlibiSlopes(spec_.num_heads);
      break;
    case PositionEncodingKind::kSinusoidal: {
      const int64_t rows = std::min(spec_.max_positions, kMaxSinusoidalCacheFloats / spec_.dim);
      sinusoidal_ = SinusoidalTable(rows, spec_.dim, spec_.sinusoidal_base);
      break;
    }
    case PositionEncodingKind::kT5: {
      const int64_t bound = std::min<int64_t>(spec_.max_distance, kMaxBucketTable);
      buckets_.resize(2 * bound + 1);
      for (int64_t r = -bound; r <= bound; ++r) {
        buckets_[r + bound] =
            T5RelativeBucket(r, spec_.bidirectional, spec_.num_buckets, spec_.max_distance);
      }
      break;
    }
    default:
      break;
  }
}

int64_t PositionEncoding::num_parameters() const {
  switch (spec_.kind) {
    case PositionEncodingKind::kLearned:
      return spec_.max_positions * spec_.dim;
    case PositionEncodingKind::kT5:
      return int64_t{spec_.num_buckets} * spec_.num_heads;
    default:
      return 0;
  }
}

void PositionEncoding::InitParameters(uint64_t seed, std::span<float> params) const {
  CheckParams(params.size(), "params");
  FillNormal(seed, spec_.init_std, params);
}

void PositionEncoding::CheckParams(size_t size, const char* what) const {
  if (static_cast<int64_t>(size) != num_parameters()) {
    throw Error(std::string(what) + ": " + Str(static_cast<int64_t>(size)) +
                " floats given, kind " + std::string(PositionEncodingKindName(spec_.kind)) +
                " has " + Str(num_parameters()) + " parameters");
  }
}

int PositionEncoding::Bucket(int64_t relative_position) const {
  if (spec_.kind != PositionEncodingKind::kT5) {
    throw Error("Bucket: kind " + std::string(PositionEncodingKindName(spec_.kind)) +
                " has no T5 buckets");
  }
  const int64_t bound = static_cast<int64_t>(buckets_.size() / 2);
  if (relative_position >= -bound && relative_position <= bound) {
    return buckets_[relative_position + bound];
  }
  return T5RelativeBucket(relative_position, spec_.bidirectional, spec_.num_buckets,
                          spec_.max_distance);
}

RopeFrequencies PositionEncoding::RopeFrequenciesFor(int64_t seq_len) const {
  if (spec_.kind != PositionEncodingKind::kRope) {
    throw Error("RopeFrequenciesFor: kind " + std::string(PositionEncodingKindName(spec_.kind)) +
                " is not rope");
  }
  return ComputeFrequencies(spec_.rope, spec_.rope_numerics, seq_len);
}

int64_t PositionEncoding::LearnedRow(int64_t position) const {
  CheckPosition(position, "learned position embedding");
  if (position < spec_.max_positions) return position;
  if (spec_.out_of_range == OutOfRange::kClamp) return spec_.max_positions - 1;
  throw Error("learned position embedding: position " + Str(position) + " is beyond the table of " +
              Str(spec_.max_positions) + " positions (max_positions; rows 0 to " +
              Str(spec_.max_positions - 1) + "); set out_of_range to clamp to use the last row");
}

void PositionEncoding::CheckEmbeddingCall(PositionSpan positions, const float* rows,
                                          const char* rows_name, int64_t row_stride,
                                          size_t params_size, const char* params_what) const {
  const int d = spec_.dim;
  if (row_stride < d) {
    throw Error("row_stride: " + Str(row_stride) + " must be >= dim " + Str(d));
  }
  if (positions.size() > 0 && rows == nullptr) {
    throw Error(std::string(rows_name) + ": null pointer");
  }
  const bool learned = spec_.kind == PositionEncodingKind::kLearned;
  if (learned) CheckParams(params_size, params_what);
  // Validate every position before touching the output.
  for (int64_t t = 0; t < positions.size(); ++t) {
    if (learned) {
      LearnedRow(positions[t]);
    } else {
      CheckPosition(positions[t], "sinusoidal position embedding");
    }
  }
}

void PositionEncoding::AddToEmbeddings(PositionSpan positions, std::span<const float> params,
                                       float* embeddings, int64_t row_stride) const {
  if (!acts_on_embeddings()) return;
  const int d = spec_.dim;
  const int64_t num_tokens = positions.size();
  CheckEmbeddingCall(positions, embeddings, "embeddings", row_stride, params.size(),
                     "params (learned table)");
  const bool learned = spec_.kind == PositionEncodingKind::kLearned;
  const double scale = embedding_scale_;
  const int64_t cached_rows = static_cast<int64_t>(sinusoidal_.size()) / d;
  std::vector<float> scratch(learned ? 0 : d);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t position = positions[t];
    const float* p;
    if (learned) {
      p = params.data() + LearnedRow(position) * d;
    } else if (position < cached_rows) {
      p = sinusoidal_.data() + position * d;
    } else {
      SinusoidalRow(position, d, spec_.sinusoidal_base, scratch.data());
      p = scratch.data();
    }
    float* x = embeddings + t * row_stride;
    // x' = scale * x + P, in double and rounded once (auto-vectorised).
    for (int c = 0; c < d; ++c) {
      x[c] = static_cast<float>(scale * static_cast<double>(x[c]) + static_cast<double>(p[c]));
    }
  }
}

void PositionEncoding::AddToEmbeddingsBackward(PositionSpan positions, float* grad,
                                               int64_t row_stride,
                                               std::span<float> grad_params) const {
  if (!acts_on_embeddings()) return;
  const int d = spec_.dim;
  const int64_t num_tokens = positions.size();
  CheckEmbeddingCall(positions, grad, "grad", row_stride, grad_params.size(),
                     "grad_params (learned table)");
  const bool learned = spec_.kind == PositionEncodingKind::kLearned;
  const double scale = embedding_scale_;
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* g = grad + t * row_stride;
    if (learned) {
      // dL/dtable[row] += dL/dx'_t, tokens in order: deterministic.
      float* table_grad = grad_params.data() + LearnedRow(positions[t]) * d;
      for (int c = 0; c < d; ++c) table_grad[c] += g[c];
    }
    if (scale != 1.0) {
      for (int c = 0; c < d; ++c) {
        g[c] = static_cast<float>(scale * static_cast<double>(g[c]));
      }
    }
  }
}

void PositionEncoding::AddLogitBias(int64_t query_position, PositionSpan key_positions, int head,
                                    std::span<const float> params, float* logits) const {
  if (!acts_on_logits()) return;
  CheckLogitArgs(query_position, head);
  const int64_t num_keys = key_positions.size();
  if (num_keys > 0 && logits == nullptr) throw Error("logits: null pointer");
  for (int64_t j = 0; j < num_keys; ++j) CheckPosition(key_positions[j], "key");
  if (spec_.kind == PositionEncodingKind::kAlibi) {
    // Press et al. 2022, eq. in sec. 3: softmax(q_i K^T + m * [-(i-1), ..., -1, 0]); the bias of
    // key j is -m * (i - j): the distance is exact, product and sum are formed in double, and the
    // result is rounded once to float32.
    const double slope = slopes_[head];
    for (int64_t j = 0; j < num_keys; ++j) {
      const double distance = static_cast<double>(query_position - key_positions[j]);
      logits[j] = static_cast<float>(static_cast<double>(logits[j]) - slope * distance);
    }
    return;
  }
  // T5: logits[j] += table[bucket(j - i), head].
  CheckParams(params.size(), "params (t5 bias table)");
  const int num_heads = spec_.num_heads;
  for (int64_t j = 0; j < num_keys; ++j) {
    logits[j] +=
        params[static_cast<size_t>(Bucket(key_positions[j] - query_position)) * num_heads + head];
  }
}

void PositionEncoding::AddLogitBiasBackward(int64_t query_position, PositionSpan key_positions,
                                            int head, const float* grad_logits,
                                            std::span<float> grad_params) const {
  if (spec_.kind != PositionEncodingKind::kT5) return;
  CheckLogitArgs(query_position, head);
  CheckParams(grad_params.size(), "grad_params (t5 bias table)");
  const int64_t num_keys = key_positions.size();
  if (num_keys > 0 && grad_logits == nullptr) throw Error("grad_logits: null pointer");
  for (int64_t j = 0; j < num_keys; ++j) CheckPosition(key_positions[j], "key");
  // Sum per bucket in double over keys in ascending order, then one float addition per bucket.
  std::vector<double> sums(spec_.num_buckets, 0.0);
  std::vector<char> touched(spec_.num_buckets, 0);
  for (int64_t j = 0; j < num_keys; ++j) {
    const int b = Bucket(key_positions[j] - query_position);
    sums[b] += static_cast<double>(grad_logits[j]);
    touched[b] = 1;
  }
  AddBucketSums(sums, touched, spec_.num_heads, head, grad_params);
}

void PositionEncoding::CheckLogitArgs(int64_t query_position, int head) const {
  if (head < 0 || head >= spec_.num_heads) {
    throw Error("head: " + Str(head) + " is out of range (accepted: 0 to " +
                Str(spec_.num_heads - 1) + ")");
  }
  CheckPosition(query_position, "query");
}

void PositionEncoding::CheckKeyRange(int64_t first_key, int64_t num_keys) const {
  if (num_keys < 0) throw Error("num_keys: " + Str(num_keys) + " must be >= 0");
  CheckPosition(first_key, "first_key");
  if (num_keys > 0) CheckPosition(first_key + num_keys - 1, "key (first_key + num_keys - 1)");
}

void PositionEncoding::AddLogitBias(int64_t query_position, int64_t first_key, int64_t num_keys,
                                    int head, std::span<const float> params, float* logits) const {
  if (!acts_on_logits()) return;
  CheckLogitArgs(query_position, head);
  CheckKeyRange(first_key, num_keys);
  if (num_keys > 0 && logits == nullptr) throw Error("logits: null pointer");
  if (spec_.kind == PositionEncodingKind::kAlibi) {
    // distance i - (first + j) = d0 - j, an exact integer in double: the same bits as the
    // PositionSpan version.
    const double slope = slopes_[head];
    const double d0 = static_cast<double>(query_position - first_key);
    for (int64_t j = 0; j < num_keys; ++j) {
      logits[j] = static_cast<float>(static_cast<double>(logits[j]) -
                                     slope * (d0 - static_cast<double>(j)));
    }
    return;
  }
  CheckParams(params.size(), "params (t5 bias table)");
  const int num_heads = spec_.num_heads;
  const float* column = params.data() + head;
  // relative position of key j: r0 + j; tabulated buckets for |r| <= bound.
  ForEachKeyBucket(*this, buckets_, first_key - query_position, num_keys,
                   [&](int64_t j, int b) { logits[j] += column[b * num_heads]; });
}

void PositionEncoding::AddLogitBiasBackward(int64_t query_position, int64_t first_key,
                                            int64_t num_keys, int head, const float* grad_logits,
                                            std::span<float> grad_params) const {
  if (spec_.kind != PositionEncodingKind::kT5) return;
  CheckLogitArgs(query_position, head);
  CheckKeyRange(first_key, num_keys);
  CheckParams(grad_params.size(), "grad_params (t5 bias table)");
  if (num_keys > 0 && grad_logits == nullptr) throw Error("grad_logits: null pointer");
  // As the PositionSpan version: per-bucket double sums over keys in ascending order.
  std::vector<double> sums(spec_.num_buckets, 0.0);
  std::vector<char> touched(spec_.num_buckets, 0);
  ForEachKeyBucket(*this, buckets_, first_key - query_position, num_keys, [&](int64_t j, int b) {
    sums[b] += static_cast<double>(grad_logits[j]);
    touched[b] = 1;
  });
  AddBucketSums(sums, touched, spec_.num_heads, head, grad_params);
}

}  // namespace ropekit
