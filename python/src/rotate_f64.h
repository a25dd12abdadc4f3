// ropekit Python module: rotation of float64 tensors.
//
// The library kernels store float32 / bfloat16 / float16. float64 tensors (needed for
// torch.autograd.gradcheck and as a high-precision path) are rotated here, in double arithmetic,
// with the cos/sin values of the same RopeTable the kernels use (RopeTable::ComputeRow, float32
// values with the attention factor applied). The result is therefore the exact rotation, up to
// double rounding, by the very angles the float32 kernels use; forward and backward use the
// same cos/sin, so backward is exactly the transpose of forward.
//
// Dimension legend: T = tokens, H = heads, D = head_dim, R = rotary_dim, N = R / 2.
#ifndef ROPEKIT_PYTHON_ROTATE_F64_H_
#define ROPEKIT_PYTHON_ROTATE_F64_H_

#include <cstdint>

#include "ropekit/rope.h"

namespace ropekit::python {

// A strided [T, H, D] float64 view (strides in elements, channels contiguous).
struct ViewF64 {
  double* data = nullptr;
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

// out = R(p) in (forward) or R(p)^T in (backward), pair by pair:
//   a' = a cos - b sin,  b' = b cos + a sin   (sin negated for backward).
// `out` may equal `in` (same data and strides) or must not overlap it. Channels [R, D) are copied.
// Throws Error on a head_dim below the rotary dim, a position count other than T, or a position
// outside [0, kMaxPosition].
void RotateF64(const RopeTable& table, PositionSpan positions, const ViewF64& in,
               const ViewF64& out, Layout layout, Direction direction);

}  // namespace ropekit::python

#endif  // ROPEKIT_PYTHON_ROTATE_F64_H_
