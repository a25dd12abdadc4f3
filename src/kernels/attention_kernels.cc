// Highway row kernels of the fused causal attention, compiled once per SIMD target and picked at
// run time (dynamic dispatch, no -march flags). Each row is processed left to right in vector
// chunks, then the tail with a one-lane tag, so the result depends on the target (lane count) but
// never on the thread count.
//
// Dimension legend: n = keys in one row of a score tile.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/attention_kernels.cc"
#include <cfloat>

// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
// clang-format on

HWY_BEFORE_NAMESPACE();
namespace ropekit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

float ExpShiftSum(float* x, int64_t n, float shift) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto vs = hn::Set(d, shift);
  const auto lowest = hn::Set(d, -FLT_MAX);  // -inf (a masked logit) -> -FLT_MAX -> exp = 0
  auto acc = hn::Zero(d);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto e = hn::Exp(d, hn::Max(hn::Sub(hn::LoadU(d, x + i), vs), lowest));
    hn::StoreU(e, d, x + i);
    acc = hn::Add(acc, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(d, acc));
  const hn::CappedTag<float, 1> d1;
  for (; i < n; ++i) {
    const auto e = hn::Exp(
        d1, hn::Max(hn::Sub(hn::LoadU(d1, x + i), hn::Set(d1, shift)), hn::Set(d1, -FLT_MAX)));
    hn::StoreU(e, d1, x + i);
    sum += hn::GetLane(e);
  }
  return sum;
}

void SoftmaxGradRow(const float* p, float* dp, int64_t n, float delta) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto vd = hn::Set(d, delta);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::Mul(hn::LoadU(d, p + i), hn::Sub(hn::LoadU(d, dp + i), vd)), d, dp + i);
  }
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "src/kernels/attention_kernels.h"

namespace ropekit {

HWY_EXPORT(ExpShiftSum);
HWY_EXPORT(SoftmaxGradRow);

float ExpShiftSumSimd(float* x, int64_t n, float shift) {
  return HWY_DYNAMIC_DISPATCH(ExpShiftSum)(x, n, shift);
}

void SoftmaxGradRowSimd(const float* p, float* dp, int64_t n, float delta) {
  HWY_DYNAMIC_DISPATCH(SoftmaxGradRow)(p, dp, n, delta);
}

}  // namespace ropekit
#endif  // HWY_ONCE
