// Plain (non-SIMD) declarations of the RoPE rotation kernels; the per-target code is in
// rope-inl.h and the dispatch table in rope_kernels.cc.
#ifndef ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_
#define ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_

#include <cstdint>
#include <span>
#include <string>

#include "ropekit/kv_cache.h"
#include "ropekit/rope.h"

namespace ropekit {

// Everything one rotation call needs, already validated by ApplyRope.
struct RotateJob {
  std::span<const RopeOperand> ops;
  const PositionSpan* positions = nullptr;  // [T]
  const float* rows = nullptr;              // table rows [num_rows, row_stride]
  int64_t num_rows = 0;
  int64_t row_stride = 0;
  const RopeTable* table = nullptr;  // computes rows for positions >= num_rows
  int num_pairs = 0;                 // N
  Layout layout = Layout::kHalfSplit;
  Direction direction = Direction::kForward;
};

// Rotates tokens [t_begin, t_end) with the best SIMD target of this CPU.
void RotateTokensSimd(const RotateJob& job, int64_t t_begin, int64_t t_end);

// ---- Engine kernels (rope_engine-inl.h) ----------------------------------------------------

// Most position axes of a multimodal rotation.
inline constexpr int kMaxPositionAxes = 8;

// Multimodal rotation: base.positions is unused; pair i of token t takes the row of
// axis_positions[pair_axis[i]][t].
struct AxesJob {
  RotateJob base;
  std::span<const PositionSpan> axis_positions;  // [A][T]
  const uint8_t* pair_axis = nullptr;            // [N]
};

// Fused rotate-and-append: base rotates the q operands; k is rotated into cache.k and v copied
// into cache.v at slots[t] (negative: skipped).
struct AppendJob {
  RotateJob base;
  TensorView k;  // [T, Hkv, D]
  TensorView v;  // [T, Hkv, D]
  KvCacheView cache;
  const int64_t* slots = nullptr;  // [T]
};

// In-place rotation of cached keys at slots by one row (cos, sin).
struct SlotRotateJob {
  KvCacheView cache;
  const int64_t* slots = nullptr;  // [count]
  const float* cos = nullptr;      // [N]
  const float* sin = nullptr;      // [N]
  int num_pairs = 0;
  Layout layout = Layout::kHalfSplit;
  Direction direction = Direction::kForward;
};

void RotateTokensAxesSimd(const AxesJob& job, int64_t t_begin, int64_t t_end);
void RotateAppendTokensSimd(const AppendJob& job, int64_t t_begin, int64_t t_end);
void RotateSlotsSimd(const SlotRotateJob& job, int64_t s_begin, int64_t s_end);
// RotateTokensSimd without per-call heap allocation, for prepared (planned) calls.
void RotateTokensPlannedSimd(const RotateJob& job, int64_t t_begin, int64_t t_end);

}  // namespace ropekit

#endif  // ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_
