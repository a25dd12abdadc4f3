// Plain (non-SIMD) declarations of the RoPE rotation kernels; the per-target code is in
// rope-inl.h and the dispatch table in rope_kernels.cc.
#ifndef ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_
#define ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_

#include <cstdint>
#include <span>
#include <string>

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

}  // namespace ropekit

#endif  // ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_
