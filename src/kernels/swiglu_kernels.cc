// Highway SwiGLU kernels (Shazeer 2020, "GLU Variants Improve Transformer"): h = silu(g) * u with
// silu(g) = g * sigmoid(g). The sigmoid is evaluated without overflow or cancellation from
// z = exp(-|g|) in (0, 1] and p = 1 / (1 + z):
//   g >= 0:  s = p,      1 - s = z * p
//   g <  0:  s = z * p,  1 - s = p
// so every quantity has a small relative error (exp: 1 ulp, then one rounding per operation).
// Backward: silu'(g) = s (1 + g (1 - s)); dg = dh * u * silu'(g), du = dh * g * s.
// Vector chunks, then the tail with a one-lane tag: the same formula for every element, so the
// result does not depend on the thread split.
//
// Dimension legend: n = elements.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/swiglu_kernels.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
// clang-format on

HWY_BEFORE_NAMESPACE();
namespace ropekit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// s = sigmoid(g) and c = 1 - s.
template <class D>
HWY_INLINE void Sigmoid(D d, hn::Vec<D> g, hn::Vec<D>& s, hn::Vec<D>& c) {
  const auto z = hn::Exp(d, hn::Neg(hn::Abs(g)));
  const auto p = hn::Div(hn::Set(d, 1.0f), hn::Add(hn::Set(d, 1.0f), z));
  const auto zp = hn::Mul(z, p);
  const auto negative = hn::Lt(g, hn::Zero(d));
  s = hn::IfThenElse(negative, zp, p);
  c = hn::IfThenElse(negative, p, zp);
}

template <class D>
HWY_INLINE void ForwardChunk(D d, const float* g, const float* u, float* h) {
  const auto vg = hn::LoadU(d, g);
  hn::Vec<D> s, c;
  Sigmoid(d, vg, s, c);
  hn::StoreU(hn::Mul(hn::Mul(vg, s), hn::LoadU(d, u)), d, h);
}

template <class D>
HWY_INLINE void BackwardChunk(D d, const float* g, const float* u, const float* dh, float* dg,
                              float* du) {
  const auto vg = hn::LoadU(d, g);
  const auto vdh = hn::LoadU(d, dh);
  hn::Vec<D> s, c;
  Sigmoid(d, vg, s, c);
  const auto dsilu = hn::Mul(s, hn::Add(hn::Set(d, 1.0f), hn::Mul(vg, c)));
  hn::StoreU(hn::Mul(hn::Mul(vdh, hn::LoadU(d, u)), dsilu), d, dg);
  hn::StoreU(hn::Mul(vdh, hn::Mul(vg, s)), d, du);
}

void SwiGlu(const float* g, const float* u, float* h, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) ForwardChunk(d, g + i, u + i, h + i);
  const hn::CappedTag<float, 1> d1;
  for (; i < n; ++i) ForwardChunk(d1, g + i, u + i, h + i);
}

void SwiGluBackward(const float* g, const float* u, const float* dh, float* dg, float* du,
                    int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) BackwardChunk(d, g + i, u + i, dh + i, dg + i, du + i);
  const hn::CappedTag<float, 1> d1;
  for (; i < n; ++i) BackwardChunk(d1, g + i, u + i, dh + i, dg + i, du + i);
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "src/kernels/swiglu_kernels.h"

namespace ropekit {

HWY_EXPORT(SwiGlu);
HWY_EXPORT(SwiGluBackward);

void SwiGluSimd(const float* g, const float* u, float* h, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SwiGlu)(g, u, h, n);
}

void SwiGluBackwardSimd(const float* g, const float* u, const float* dh, float* dg, float* du,
                        int64_t n) {
  HWY_DYNAMIC_DISPATCH(SwiGluBackward)(g, u, dh, dg, du, n);
}

}  // namespace ropekit
#endif  // HWY_ONCE
