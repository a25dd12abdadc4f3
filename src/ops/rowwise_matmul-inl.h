// Highway per-target kernel of MatMulRowwise (included once per SIMD target by foreach_target.h).
// See rowwise_matmul.h for the per-element arithmetic contract.
//
// Dimension legend: M = rows, K = input features, N = output features, L = lanes.
// A tile is RM rows x RN columns (RM, RN <= 4): RM * RN vector accumulators, one per output
// element, each walking K in steps of L. Edge tiles use smaller RM / RN with the very same
// per-element operations, so an element's value does not depend on the tile that computes it.
#if defined(ROPEKIT_SRC_OPS_ROWWISE_MATMUL_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ROPEKIT_SRC_OPS_ROWWISE_MATMUL_INL_H_
#undef ROPEKIT_SRC_OPS_ROWWISE_MATMUL_INL_H_
#else
#define ROPEKIT_SRC_OPS_ROWWISE_MATMUL_INL_H_
#endif

#include <cstdint>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace ropekit::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <int RM, int RN>
HWY_INLINE void RowwiseTile(const float* HWY_RESTRICT x, const float* HWY_RESTRICT w,
                            float* HWY_RESTRICT y, int64_t k, int64_t n, bool accumulate) {
  const hn::CappedTag<float, 8> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  using V = hn::Vec<decltype(df)>;
  V acc[RM][RN];
  for (int i = 0; i < RM; ++i) {
    for (int j = 0; j < RN; ++j) acc[i][j] = hn::Zero(df);
  }
  int64_t kk = 0;
  for (; kk + L <= k; kk += L) {
    V xv[RM];
    for (int i = 0; i < RM; ++i) xv[i] = hn::LoadU(df, x + i * k + kk);
    for (int j = 0; j < RN; ++j) {
      const V wv = hn::LoadU(df, w + j * k + kk);
      for (int i = 0; i < RM; ++i) acc[i][j] = hn::MulAdd(xv[i], wv, acc[i][j]);
    }
  }
  if (kk < k) {  // tail: missing lanes hold 0 and add 0 * 0
    const int64_t rest = k - kk;
    HWY_ALIGN float buf[hn::MaxLanes(df)] = {};
    V xv[RM];
    for (int i = 0; i < RM; ++i) {
      for (int64_t t = 0; t < rest; ++t) buf[t] = x[i * k + kk + t];
      xv[i] = hn::Load(df, buf);
    }
    for (int j = 0; j < RN; ++j) {
      for (int64_t t = 0; t < rest; ++t) buf[t] = w[j * k + kk + t];
      const V wv = hn::Load(df, buf);
      for (int i = 0; i < RM; ++i) acc[i][j] = hn::MulAdd(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < RM; ++i) {
    for (int j = 0; j < RN; ++j) {
      const float s = hn::GetLane(hn::SumOfLanes(df, acc[i][j]));
      y[i * n + j] = accumulate ? y[i * n + j] + s : s;
    }
  }
}

template <int RM>
HWY_INLINE void RowwiseRows(const float* x, const float* w, float* y, int64_t k, int64_t n,
                            int64_t c0, int64_t c1, bool accumulate) {
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) RowwiseTile<RM, 4>(x, w + c * k, y + c, k, n, accumulate);
  switch (c1 - c) {
    case 3:
      RowwiseTile<RM, 3>(x, w + c * k, y + c, k, n, accumulate);
      break;
    case 2:
      RowwiseTile<RM, 2>(x, w + c * k, y + c, k, n, accumulate);
      break;
    case 1:
      RowwiseTile<RM, 1>(x, w + c * k, y + c, k, n, accumulate);
      break;
    default:
      break;
  }
}

// Rows [r0, r1) x columns [c0, c1) of y.
HWY_NOINLINE void RowwiseBlock(const float* x, const float* w, float* y, int64_t k, int64_t n,
                               int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool accumulate) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) RowwiseRows<4>(x + r * k, w, y + r * n, k, n, c0, c1, accumulate);
  switch (r1 - r) {
    case 3:
      RowwiseRows<3>(x + r * k, w, y + r * n, k, n, c0, c1, accumulate);
      break;
    case 2:
      RowwiseRows<2>(x + r * k, w, y + r * n, k, n, c0, c1, accumulate);
      break;
    case 1:
      RowwiseRows<1>(x + r * k, w, y + r * n, k, n, c0, c1, accumulate);
      break;
    default:
      break;
  }
}

HWY_NOINLINE int64_t RowwiseLanes() {
  const hn::CappedTag<float, 8> df;
  return static_cast<int64_t>(hn::Lanes(df));
}

}  // namespace ropekit::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard
