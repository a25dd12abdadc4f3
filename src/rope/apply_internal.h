// Argument checks and table growth shared by every entry point that rotates (ApplyRope, the
// multimodal overload, the fused KV-cache append, context shift and prepared calls), so that
// they all reject the same inputs with the same messages.
#ifndef ROPEKIT_SRC_ROPE_APPLY_INTERNAL_H_
#define ROPEKIT_SRC_ROPE_APPLY_INTERNAL_H_

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ropekit/rope.h"
#include "src/kernels/rope_kernels.h"

namespace ropekit::internal {

// Layout and direction are known values.
void ValidateCall(const RopeTable& table, const RotateOptions& options);
// Every position in [0, kMaxPosition] (errors name `name`[t]); returns the table rows needed.
int64_t CheckPositions(const RopeTable& table, PositionSpan positions, const std::string& name);
// Shapes, dtypes, strides and overlaps of the operands of one call of T tokens. kF64 is accepted
// only with allow_f64 (the one-axis ApplyRope, which rotates it on the reference path).
void ValidateOperands(std::span<const RopeOperand> ops, int64_t num_tokens, int rotary_dim,
                      bool allow_f64 = false);
// One view: dtype, T, head_dim >= rotary_dim, non-overlapping heads and tokens.
void ValidateTensor(const TensorView& v, const std::string& name, int64_t num_tokens,
                    int rotary_dim);
// Whether two non-empty views may share an element (exact for token-major views).
bool Overlap(const TensorView& a, const TensorView& b);
// Grows the table when the rows a call needs are few compared with its work.
void GrowTable(const RopeTable& table, int64_t needed_rows, int64_t num_tokens);
// Backend::kReference, or kAuto with ROPEKIT_BACKEND=reference.
bool UseReferenceBackend(Backend backend);
// The pool to split a call that reads `bytes` tensor bytes over: null (the calling thread) when
// the work is below options.min_parallel_bytes (a decode step, a few tokens).
ThreadPool* PoolFor(const RotateOptions& options, int64_t bytes);
// Tensor bytes a call reads: T times the heads times D times the element size, every operand.
int64_t CallBytes(std::span<const RopeOperand> ops, int64_t num_tokens);

// Table rows of one call: rows of the snapshot for positions below it, else computed into the
// caller's scratch (2N floats). The kernels receive the row, never the table.
class RowLookup {
 public:
  RowLookup(const RopeTable& table, RopeTable::Rows rows)
      : table_(&table), rows_(std::move(rows)), n_(table.num_pairs()) {}
  // Row of position p: cos at [0, N), sin at [N, 2N).
  const float* Row(int64_t p, float* scratch) const {
    if (p < rows_.num_positions) return rows_.data.get() + p * rows_.row_stride;
    table_->ComputeRow(p, scratch, scratch + n_);
    return scratch;
  }
  const RopeTable::Rows& rows() const { return rows_; }
  int num_pairs() const { return n_; }

 private:
  const RopeTable* table_;
  RopeTable::Rows rows_;
  int n_;
};

// The heads of token t of an operand (in -> out).
HeadRows TokenHeads(const RopeOperand& op, int64_t t);
// One RotateHeads function per operand (they may differ in dtype).
std::vector<RotateHeadsFn> ResolveOperandFns(std::span<const RopeOperand> ops,
                                             const RotateOptions& options);
// Rotates token t of every operand with one row.
void RotateTokenRow(std::span<const RopeOperand> ops, std::span<const RotateHeadsFn> fns, int64_t t,
                    const float* row, int num_pairs);

// Most position axes of a multimodal rotation.
inline constexpr int kMaxPositionAxes = 8;

// Multimodal positions: as many axes as `axes` needs, T entries each, every position valid;
// returns the table rows needed.
int64_t CheckAxisPositions(const RopeTable& table, const AxisPositions& positions,
                           const RopeAxes& axes);

// Rows of multimodal tokens: pair i of token t takes the row of positions.axes[pair_axis[i]][t].
// One per thread (it owns the scratch rows).
class AxisRows {
 public:
  AxisRows(const RowLookup& lookup, const AxisPositions& positions, const uint8_t* pair_axis);
  // The gathered row of token t (cos then sin), valid until the next call.
  const float* Row(int64_t t);

 private:
  const RowLookup* lookup_;
  AxisPositions positions_;
  const uint8_t* pair_axis_;
  std::vector<float> scratch_;  // [A] computed rows, then the gathered row (2N each)
};

}  // namespace ropekit::internal

#endif  // ROPEKIT_SRC_ROPE_APPLY_INTERNAL_H_
