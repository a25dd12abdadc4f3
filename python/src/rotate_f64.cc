// ropekit Python module: float64 rotation with the library's cos/sin table (see rotate_f64.h).
//
// Dimension legend: T = tokens, H = heads, D = head_dim, R = rotary_dim, N = R / 2.
// RoFormer (Su et al. 2021, eq. 34): pair (a, b) at position p rotated by theta = p * w_i:
//   a' = a cos(theta) - b sin(theta),  b' = b cos(theta) + a sin(theta).
#include "rotate_f64.h"

#include <string>
#include <vector>

#include "ropekit/error.h"

namespace ropekit::python {

void RotateF64(const RopeTable& table, PositionSpan positions, const ViewF64& in,
               const ViewF64& out, Layout layout, Direction direction) {
  const int64_t num_pairs = table.num_pairs();
  const int64_t rotary_dim = table.rotary_dim();
  if (in.head_dim < rotary_dim) {
    throw Error("head_dim " + std::to_string(in.head_dim) + " is smaller than rotary_dim " +
                std::to_string(rotary_dim));
  }
  if (positions.size() != in.num_tokens) {
    throw Error("positions has " + std::to_string(positions.size()) +
                " entries, expected T = " + std::to_string(in.num_tokens));
  }
  std::vector<float> row(2 * static_cast<size_t>(num_pairs));
  const float* cos = row.data();
  const float* sin = row.data() + num_pairs;
  const double sign = direction == Direction::kForward ? 1.0 : -1.0;
  const bool in_place = in.data == out.data && in.token_stride == out.token_stride &&
                        in.head_stride == out.head_stride;
  for (int64_t t = 0; t < in.num_tokens; ++t) {
    const int64_t p = positions[static_cast<size_t>(t)];
    if (p < 0 || p > kMaxPosition) {
      throw Error("positions[" + std::to_string(t) + "] = " + std::to_string(p) +
                  " is out of range [0, " + std::to_string(kMaxPosition) + "]");
    }
    table.ComputeRow(p, row.data(), row.data() + num_pairs);
    for (int64_t h = 0; h < in.num_heads; ++h) {
      const double* x = in.data + t * in.token_stride + h * in.head_stride;
      double* y = out.data + t * out.token_stride + h * out.head_stride;
      for (int64_t i = 0; i < num_pairs; ++i) {
        const int64_t ia = layout == Layout::kHalfSplit ? i : 2 * i;
        const int64_t ib = layout == Layout::kHalfSplit ? i + num_pairs : 2 * i + 1;
        const double c = cos[i];
        const double s = sign * static_cast<double>(sin[i]);
        const double a = x[ia];
        const double b = x[ib];
        y[ia] = a * c - b * s;
        y[ib] = b * c + a * s;
      }
      if (!in_place) {
        for (int64_t d = rotary_dim; d < in.head_dim; ++d) y[d] = x[d];
      }
    }
  }
}

}  // namespace ropekit::python
