// Plain (non-SIMD) declarations of the RoPE rotation kernels; the per-target code is in
// rope-inl.h and the dispatch table in rope_kernels.cc.
#ifndef ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_
#define ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_

#include <cstdint>
#include <span>
#include <string>

#include "ropekit/rope.h"

namespace ropekit {

// Everything one rotation call needs, already validated by the caller. The kernel reads rows
// only: every position must be below num_rows (the caller rotates tokens at positions past the
// table with RotateHeads and a row it computed).
struct RotateJob {
  std::span<const RopeOperand> ops;
  const PositionSpan* positions = nullptr;  // [T], each in [0, num_rows)
  const float* rows = nullptr;              // table rows [num_rows, row_stride]
  int64_t num_rows = 0;
  int64_t row_stride = 0;
  int num_pairs = 0;  // N
  Layout layout = Layout::kHalfSplit;
  Direction direction = Direction::kForward;
};

// Rotates tokens [t_begin, t_end) with the best SIMD target of this CPU.
void RotateTokensSimd(const RotateJob& job, int64_t t_begin, int64_t t_end);

// ---- One token's heads (rope_engine-inl.h) --------------------------------------------------

// The H heads of one token of one operand: head h is D elements at in + h * in_head_stride,
// rotated into out + h * out_head_stride (out may be in: in place). Strides are in elements.
struct HeadRows {
  const void* in = nullptr;
  void* out = nullptr;
  int64_t in_head_stride = 0;
  int64_t out_head_stride = 0;
  int64_t num_heads = 0;  // H
  int64_t head_dim = 0;   // D
};

// Rotates every head with one row: cos[0, N), sin[0, N) (the caller's table row, attention
// factor applied). A plain function of one SIMD target, dtype, layout and direction.
using RotateHeadsFn = void (*)(const HeadRows& heads, const float* cos, const float* sin,
                               size_t num_pairs);

// Loop order of a RotateHeadsFn. kPairsOuter (RotateHeads) loads each cos/sin vector once and
// sweeps it over every head: the fastest for one token whose heads sit in the L1 cache (a decode
// step). kHeadsOuter (RotateHeadsStream) reads each head front to back: the fastest for calls of
// many tokens streamed from memory (a prompt). Both give the same bits.
enum class HeadOrder { kPairsOuter, kHeadsOuter };

// The best target's RotateHeads for this CPU; resolve once, call many times. Throws nothing;
// null only for an unknown dtype.
RotateHeadsFn ResolveRotateHeads(DType dtype, Layout layout, Direction direction,
                                 HeadOrder order = HeadOrder::kPairsOuter);

}  // namespace ropekit

#endif  // ROPEKIT_SRC_KERNELS_ROPE_KERNELS_H_
