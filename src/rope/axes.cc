// Multimodal / N-axis positions (M-RoPE; see include/ropekit/rope.h): the pair-to-axis rules
// and the multimodal ApplyRope.
//
// Dimension legend: A = axes, T = tokens, N = rotated pairs.
//
// Chunked (Qwen2-VL, arXiv:2409.12191; transformers `apply_multimodal_rotary_pos_emb`): cos/sin
// of every axis are split along the channels into sections * 2 chunks and chunk j takes axis
// j mod A, i.e. pair i < s_0 follows axis 0, the next s_1 pairs axis 1, and so on (the same in
// both halves of a half-split head; for interleaved channels the pair index is the same).
// Interleaved (Qwen3-VL, transformers `apply_interleaved_mrope`): start from axis 0 everywhere;
// for a >= 1 the pairs a, a + A, a + 2A, ... below A * s_a take axis a.
#include <algorithm>
#include <array>
#include <numeric>
#include <string>

#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"
#include "src/kernels/rope_kernels.h"
#include "src/reference/rope.h"
#include "src/rope/apply_internal.h"

namespace ropekit {

std::vector<uint8_t> RopeAxes::PairAxes(int num_pairs) const {
  std::vector<uint8_t> axis(static_cast<size_t>(std::max(num_pairs, 0)), 0);
  if (sections.empty()) return axis;
  const int num = num_axes();
  if (num > internal::kMaxPositionAxes) {
    throw Error("sections has " + std::to_string(num) + " entries; at most " +
                std::to_string(internal::kMaxPositionAxes) + " position axes are supported");
  }
  int64_t sum = 0;
  for (int a = 0; a < num; ++a) {
    const int s = sections[a];
    if (s < 1) {
      throw Error("sections[" + std::to_string(a) + "] = " + std::to_string(s) +
                  " must be >= 1 (pairs that follow axis " + std::to_string(a) + ")");
    }
    sum += s;
  }
  if (sum != num_pairs) {
    throw Error("sections " + Describe() + " sum to " + std::to_string(sum) +
                " but the rotation has " + std::to_string(num_pairs) +
                " pairs (rotary_dim / 2); the sections must sum to it");
  }
  if (!interleaved) {
    int i = 0;
    for (int a = 0; a < num; ++a) {
      for (int k = 0; k < sections[a]; ++k) axis[i++] = static_cast<uint8_t>(a);
    }
    return axis;
  }
  for (int a = 1; a < num; ++a) {
    const int64_t span = int64_t{num} * sections[a];
    if (span > num_pairs) {
      throw Error("interleaved sections " + Describe() + ": axis " + std::to_string(a) + " needs " +
                  std::to_string(num) + " * " + std::to_string(sections[a]) + " = " +
                  std::to_string(span) + " pairs but the rotation has " +
                  std::to_string(num_pairs));
    }
    for (int64_t i = a; i < span; i += num) axis[i] = static_cast<uint8_t>(a);
  }
  return axis;
}

std::string RopeAxes::Describe() const {
  if (sections.empty()) return "text (one axis)";
  std::string out = interleaved ? "interleaved [" : "chunked [";
  for (size_t a = 0; a < sections.size(); ++a) {
    out += (a ? ", " : "") + std::to_string(sections[a]);
  }
  return out + "]";
}

namespace internal {

int64_t CheckAxisPositions(const RopeTable& table, const AxisPositions& positions,
                           const RopeAxes& axes) {
  const int num_axes = axes.num_axes();
  if (static_cast<int>(positions.axes.size()) != num_axes) {
    throw Error("positions have " + std::to_string(positions.axes.size()) +
                " axes but the rotation " + axes.Describe() + " needs " + std::to_string(num_axes) +
                " ([A, T] = [" + std::to_string(num_axes) + ", T])");
  }
  const int64_t num_tokens = positions.num_tokens();
  int64_t needed_rows = 0;
  for (int a = 0; a < num_axes; ++a) {
    const PositionSpan& p = positions.axes[a];
    if (p.size() != num_tokens) {
      throw Error("positions axis " + std::to_string(a) + " has " + std::to_string(p.size()) +
                  " entries but axis 0 has " + std::to_string(num_tokens));
    }
    needed_rows = std::max(
        needed_rows, internal::CheckPositions(table, p, "positions[" + std::to_string(a) + "]"));
  }
  return needed_rows;
}

AxisRows::AxisRows(const RowLookup& lookup, const AxisPositions& positions,
                   const uint8_t* pair_axis)
    : lookup_(&lookup),
      positions_(positions),
      pair_axis_(pair_axis),
      scratch_(2 * static_cast<size_t>(lookup.num_pairs()) * (positions.axes.size() + 1)) {}

const float* AxisRows::Row(int64_t t) {
  const size_t n = static_cast<size_t>(lookup_->num_pairs());
  const size_t num_axes = positions_.axes.size();
  float* gathered = scratch_.data() + 2 * n * num_axes;
  std::array<const float*, kMaxPositionAxes> axis_rows{};
  for (size_t a = 0; a < num_axes; ++a) {
    axis_rows[a] = lookup_->Row(positions_.axes[a][t], scratch_.data() + 2 * n * a);
  }
  for (size_t i = 0; i < n; ++i) {
    const float* row = axis_rows[pair_axis_[i]];
    gathered[i] = row[i];
    gathered[n + i] = row[n + i];
  }
  return gathered;
}

}  // namespace internal

void ApplyRope(const RopeTable& table, const AxisPositions& positions, const RopeAxes& axes,
               std::span<const RopeOperand> ops, const RotateOptions& options) {
  internal::ValidateCall(table, options);
  const int n = table.num_pairs();
  const std::vector<uint8_t> pair_axis = axes.PairAxes(n);
  const int num_axes = axes.num_axes();
  const int64_t needed_rows = internal::CheckAxisPositions(table, positions, axes);
  const int64_t num_tokens = positions.num_tokens();
  internal::ValidateOperands(ops, num_tokens, table.rotary_dim());
  if (num_tokens == 0) return;
  internal::GrowTable(table, needed_rows, num_tokens);
  const internal::RowLookup lookup(table, table.Snapshot());
  const bool reference = internal::UseReferenceBackend(options.backend);
  const std::vector<RotateHeadsFn> fns = internal::ResolveOperandFns(ops, options);
  const auto range_fn = [&](size_t begin, size_t end, size_t /*worker*/) {
    if (reference) {
      std::vector<float> axis_cos(static_cast<size_t>(n) * num_axes);
      std::vector<float> axis_sin(axis_cos.size());
      reference::ApplyRopeTokens(ops, n, options.layout, options.direction,
                                 static_cast<int64_t>(begin), static_cast<int64_t>(end),
                                 [&](int64_t t, float* cos, float* sin) {
                                   for (int a = 0; a < num_axes; ++a) {
                                     table.ComputeRow(positions.axes[a][t], axis_cos.data() + a * n,
                                                      axis_sin.data() + a * n);
                                   }
                                   for (int i = 0; i < n; ++i) {
                                     cos[i] = axis_cos[pair_axis[i] * n + i];
                                     sin[i] = axis_sin[pair_axis[i] * n + i];
                                   }
                                 });
      return;
    }
    // Pair i of token t takes the row of its axis' position; the gathered row is rotated like
    // any table row, so equal positions on every axis give the one-axis bits.
    internal::AxisRows rows(lookup, positions, pair_axis.data());
    for (size_t t = begin; t < end; ++t) {
      internal::RotateTokenRow(ops, fns, static_cast<int64_t>(t), rows.Row(static_cast<int64_t>(t)),
                               n);
    }
  };
  ParallelFor(internal::PoolFor(options, internal::CallBytes(ops, num_tokens)),
              static_cast<size_t>(num_tokens), range_fn);
}

}  // namespace ropekit
