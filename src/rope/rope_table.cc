// The shared cos/sin table (see include/ropekit/rope.h).
//
// Row p holds A*cos(p*w_i) and A*sin(p*w_i) for every pair i, rounded once to float32:
//  - Numerics::kExact: the angle p*w_i is carried as an unevaluated double-double sum hi + lo
//    (lo = fma(p, w, -hi) is the exact rounding error of the product), and
//    cos(hi + lo) = cos(hi) - sin(hi)*lo, sin(hi + lo) = sin(hi) + cos(hi)*lo (|lo| <= 2^-22, so
//    the dropped second-order terms are below 2^-45). cos/sin come from the double libm.
//  - Numerics::kHf: transformers' float32 pipeline, theta = fl32(p) * w_i in float32, then
//    cos/sin of that float angle (evaluated in double, rounded to float32) times fl32(A).
// The table grows geometrically up to kMaxTableBytes; rows past it are computed on demand with
// the same function, so a position gives identical values wherever it is looked up.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <new>

#include "ropekit/rope.h"

namespace ropekit {
namespace {

constexpr int64_t kRowAlignFloats = 16;                // 64 bytes: one AVX-512 vector
constexpr int64_t kMaxTableBytes = int64_t{64} << 20;  // 64 MiB per table
constexpr std::align_val_t kRowAlignBytes{64};

// Zeroed rows whose first float, hence every row (row_stride is a multiple of 16 floats), starts
// on a 64-byte boundary: a vector load of a row never straddles two cache lines (misaligned rows
// cost the rotation of a long prompt about a fifth of its time).
std::shared_ptr<float[]> AllocateRows(int64_t floats) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  float* rows = static_cast<float*>(::operator new[](bytes, kRowAlignBytes));
  std::memset(rows, 0, bytes);
  return std::shared_ptr<float[]>(rows, [](float* p) { ::operator delete[](p, kRowAlignBytes); });
}

}  // namespace

struct RopeTable::State {
  mutable std::mutex mutex;
  std::shared_ptr<const float[]> rows;
  int64_t capacity = 0;
};

RopeTable::RopeTable(RopeFrequencies frequencies, int64_t initial_positions)
    : freq_(std::move(frequencies)), state_(std::make_unique<State>()) {
  const int64_t n = num_pairs();
  if (freq_.rotary_dim < 2 || freq_.rotary_dim % 2 != 0 ||
      static_cast<int64_t>(freq_.inv_freq.size()) != n) {
    throw Error(
        "RopeTable: rotary_dim must be even and >= 2 with rotary_dim/2 inverse frequencies");
  }
  for (double w : freq_.inv_freq) {
    if (!std::isfinite(w) || w < 0)
      throw Error("RopeTable: inverse frequencies must be finite and >= 0");
  }
  if (!std::isfinite(freq_.attention_factor) || freq_.attention_factor <= 0) {
    throw Error("RopeTable: attention_factor must be finite and > 0");
  }
  if (freq_.numerics != Numerics::kExact && freq_.numerics != Numerics::kHf) {
    throw Error("RopeTable: unknown numerics policy");
  }
  row_stride_ = (2 * n + kRowAlignFloats - 1) / kRowAlignFloats * kRowAlignFloats;
  if (initial_positions < 0) throw Error("RopeTable: initial_positions must be >= 0");
  Reserve(initial_positions);
}

RopeTable::~RopeTable() = default;

void RopeTable::ComputeRow(int64_t position, float* cos_out, float* sin_out) const {
  const int n = num_pairs();
  if (freq_.numerics == Numerics::kHf) {
    const float p = static_cast<float>(position);
    const float a = static_cast<float>(freq_.attention_factor);
    for (int i = 0; i < n; ++i) {
      const float theta = p * static_cast<float>(freq_.inv_freq[i]);
      cos_out[i] = static_cast<float>(std::cos(static_cast<double>(theta))) * a;
      sin_out[i] = static_cast<float>(std::sin(static_cast<double>(theta))) * a;
    }
    return;
  }
  const double p = static_cast<double>(position);
  const double a = freq_.attention_factor;
  for (int i = 0; i < n; ++i) {
    const double w = freq_.inv_freq[i];
    const double hi = p * w;
    const double lo = std::fma(p, w, -hi);
    const double c = std::cos(hi), s = std::sin(hi);
    cos_out[i] = static_cast<float>(a * (c - s * lo));
    sin_out[i] = static_cast<float>(a * (s + c * lo));
  }
}

int64_t RopeTable::max_capacity() const {
  return std::max<int64_t>(1, kMaxTableBytes / (row_stride_ * static_cast<int64_t>(sizeof(float))));
}

void RopeTable::Reserve(int64_t num_positions) const {
  const int64_t max_rows = max_capacity();
  num_positions = std::min(num_positions, max_rows);
  std::lock_guard<std::mutex> lock(state_->mutex);
  const int64_t old_capacity = state_->capacity;
  if (num_positions <= old_capacity) return;
  const int64_t new_capacity =
      std::min(max_rows, std::max(num_positions, old_capacity + old_capacity / 2));
  std::shared_ptr<float[]> rows = AllocateRows(new_capacity * row_stride_);
  if (old_capacity > 0) {
    std::memcpy(rows.get(), state_->rows.get(), sizeof(float) * old_capacity * row_stride_);
  }
  const int n = num_pairs();
  for (int64_t p = old_capacity; p < new_capacity; ++p) {
    float* row = rows.get() + p * row_stride_;
    ComputeRow(p, row, row + n);
  }
  state_->rows = std::move(rows);
  state_->capacity = new_capacity;
}

RopeTable::Rows RopeTable::Snapshot() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return Rows{state_->rows, state_->capacity, row_stride_};
}

int64_t RopeTable::capacity() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->capacity;
}

}  // namespace ropekit
