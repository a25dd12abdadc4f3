// Scalar double-precision reference of the RoPE rotation (RoFormer, arXiv:2104.09864, eq. 34):
//   y_a = x_a cos(theta_i) - x_b sin(theta_i),   y_b = x_b cos(theta_i) + x_a sin(theta_i)
// for each pair (a, b) = (i, i + N) (half-split) or (2i, 2i + 1) (interleaved); the backward
// (transposed) rotation uses -sin. Plain loops, no threading, no SIMD: this is the oracle that
// every fast path is tested against, and the Backend::kReference implementation.
//
// Dimension legend: T = tokens, H = heads, D = head_dim, R = rotary_dim, N = R / 2.
#ifndef ROPEKIT_SRC_REFERENCE_ROPE_H_
#define ROPEKIT_SRC_REFERENCE_ROPE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "ropekit/half.h"
#include "ropekit/rope.h"

namespace ropekit::reference {

// Rotates one head. T is double (or std::complex<double> for complex-step derivatives).
// x, y: [D] (may alias); cos, sin: [N] (the table row, attention factor included).
template <typename T>
void RotateHead(const T* x, T* y, const float* cos, const float* sin, int num_pairs, int head_dim,
                Layout layout, Direction direction) {
  const double sign = direction == Direction::kForward ? 1.0 : -1.0;
  for (int i = 0; i < num_pairs; ++i) {
    const int ia = layout == Layout::kHalfSplit ? i : 2 * i;
    const int ib = layout == Layout::kHalfSplit ? i + num_pairs : 2 * i + 1;
    const double c = cos[i];
    const double s = sign * double{sin[i]};
    const T a = x[ia], b = x[ib];
    y[ia] = a * c - b * s;
    y[ib] = b * c + a * s;
  }
  for (int k = 2 * num_pairs; k < head_dim; ++k) y[k] = x[k];
}

inline double LoadAsDouble(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(base)[index];
    case DType::kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kF16:
      return F16ToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kF64:
      return static_cast<const double*>(base)[index];
    default:
      return 0.0;
  }
}

// Rounds to float32, then (for 16-bit types) to the storage type with round-to-nearest-even;
// kF64 stores the double unrounded.
inline void StoreFromDouble(void* base, DType dtype, int64_t index, double value) {
  if (dtype == DType::kF64) {
    static_cast<double*>(base)[index] = value;
    return;
  }
  const float f = static_cast<float>(value);
  switch (dtype) {
    case DType::kF32:
      static_cast<float*>(base)[index] = f;
      break;
    case DType::kBF16:
      static_cast<uint16_t*>(base)[index] = FloatToBf16(f);
      break;
    case DType::kF16:
      static_cast<uint16_t*>(base)[index] = FloatToF16(f);
      break;
    default:
      break;
  }
}

// Rotates tokens [t_begin, t_end) of every operand. `row(t, cos, sin)` fills the table row of
// token t. The caller has validated shapes, dtypes and positions.
template <class RowFn>
void ApplyRopeTokens(std::span<const RopeOperand> ops, int num_pairs, Layout layout,
                     Direction direction, int64_t t_begin, int64_t t_end, const RowFn& row) {
  std::vector<float> cos(num_pairs), sin(num_pairs);
  std::vector<double> x, y;
  for (int64_t t = t_begin; t < t_end; ++t) {
    row(t, cos.data(), sin.data());
    for (const RopeOperand& op : ops) {
      const int64_t d = op.in.head_dim;
      x.resize(d);
      y.resize(d);
      for (int64_t h = 0; h < op.in.num_heads; ++h) {
        const int64_t in_off = t * op.in.token_stride + h * op.in.head_stride;
        const int64_t out_off = t * op.out.token_stride + h * op.out.head_stride;
        for (int64_t k = 0; k < d; ++k) x[k] = LoadAsDouble(op.in.data, op.in.dtype, in_off + k);
        RotateHead(x.data(), y.data(), cos.data(), sin.data(), num_pairs, static_cast<int>(d),
                   layout, direction);
        for (int64_t k = 0; k < d; ++k)
          StoreFromDouble(op.out.data, op.out.dtype, out_off + k, y[k]);
      }
    }
  }
}

}  // namespace ropekit::reference

#endif  // ROPEKIT_SRC_REFERENCE_ROPE_H_
