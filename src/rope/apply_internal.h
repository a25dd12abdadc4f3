// Argument checks and table growth shared by every entry point that rotates (ApplyRope, the
// multimodal overload, the fused KV-cache append, context shift and prepared calls), so that
// they all reject the same inputs with the same messages.
#ifndef ROPEKIT_SRC_ROPE_APPLY_INTERNAL_H_
#define ROPEKIT_SRC_ROPE_APPLY_INTERNAL_H_

#include <cstdint>
#include <span>
#include <string>

#include "ropekit/rope.h"

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

}  // namespace ropekit::internal

#endif  // ROPEKIT_SRC_ROPE_APPLY_INTERNAL_H_
