// Rotates one query head with the installed ropekit::core and checks the result against the
// RoFormer formula evaluated here in double precision: x'_i = x_i cos(p w_i) - x_{i+R/2} sin(p w_i)
// for the half-split layout, w_i = base^(-2i/R). float32 storage and float32 cos/sin bound the
// error by a few ulps of |x| = 1, so 1e-5 is a safe margin.
#include <cmath>
#include <cstdio>
#include <vector>

#include "ropekit/rope.h"

int main() {
  constexpr int kDim = 8;
  constexpr double kBase = 10000.0;
  constexpr int kPosition = 7;
  ropekit::RopeParams params;
  params.head_dim = kDim;
  params.base = kBase;
  params.rotary_dim = kDim;
  ropekit::RopeTable table(ropekit::ComputeFrequencies(params, ropekit::Numerics::kExact));
  std::vector<float> q(kDim);
  for (int i = 0; i < kDim; ++i) q[i] = static_cast<float>(i + 1) / kDim;
  const std::vector<float> original = q;
  const std::vector<int32_t> positions = {kPosition};
  ropekit::ApplyRopeInPlace(table, positions,
                            ropekit::ContiguousView(q.data(), ropekit::DType::kF32, 1, 1, kDim));
  double worst = 0;
  for (int i = 0; i < kDim / 2; ++i) {
    const double angle = kPosition * std::pow(kBase, -2.0 * i / kDim);
    const double a = original[i], b = original[i + kDim / 2];
    worst = std::fmax(worst, std::fabs(q[i] - (a * std::cos(angle) - b * std::sin(angle))));
    worst =
        std::fmax(worst, std::fabs(q[i + kDim / 2] - (b * std::cos(angle) + a * std::sin(angle))));
  }
  std::printf("consumer: max error %.3g\n", worst);
  return worst < 1e-5 ? 0 : 1;
}
