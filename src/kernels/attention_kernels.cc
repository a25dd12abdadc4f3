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

// Decoding kernels use at most 8 lanes: with head_dim 32 that is four independent multiply-add
// chains per row instead of two on 16-lane targets, and a shorter lane reduction.
using DecodeTag = hn::CappedTag<float, 8>;

// s[j] = scale * (q . k_j) for the n rows k_j = k + j * stride of D floats. Each dot product:
// lane-wise partial sums in ascending d, SumOfLanes, then the D % lanes tail added in ascending
// d. Keys go four at a time (four independent chains, the same operations for each key).
void ScoreRow(const float* HWY_RESTRICT q, const float* HWY_RESTRICT k, int64_t stride, int64_t n,
              int64_t D, float scale, float* HWY_RESTRICT s) {
  const DecodeTag d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const int64_t body = D / N * N;
  auto finish = [&](decltype(hn::Zero(d)) acc, const float* kj) {
    float dot = hn::GetLane(hn::SumOfLanes(d, acc));
    for (int64_t c = body; c < D; ++c) dot += q[c] * kj[c];
    return scale * dot;
  };
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = k + j * stride;
    const float* k1 = k0 + stride;
    const float* k2 = k1 + stride;
    const float* k3 = k2 + stride;
    auto a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    for (int64_t c = 0; c < body; c += N) {
      const auto qv = hn::LoadU(d, q + c);
      a0 = hn::MulAdd(qv, hn::LoadU(d, k0 + c), a0);
      a1 = hn::MulAdd(qv, hn::LoadU(d, k1 + c), a1);
      a2 = hn::MulAdd(qv, hn::LoadU(d, k2 + c), a2);
      a3 = hn::MulAdd(qv, hn::LoadU(d, k3 + c), a3);
    }
    s[j] = finish(a0, k0);
    s[j + 1] = finish(a1, k1);
    s[j + 2] = finish(a2, k2);
    s[j + 3] = finish(a3, k3);
  }
  for (; j < n; ++j) {
    const float* kj = k + j * stride;
    auto a0 = hn::Zero(d);
    for (int64_t c = 0; c < body; c += N) {
      a0 = hn::MulAdd(hn::LoadU(d, q + c), hn::LoadU(d, kj + c), a0);
    }
    s[j] = finish(a0, kj);
  }
}

// out[c] = inv * sum_j p[j] v_j[c] over the n rows v_j (ascending j, one multiply-add per term
// and lane, then one multiplication by inv). Rows: v_j = v + j * stride, or, with a block table
// (paged cache, page_size P), v_j = v + (block_table[j / P] * P + j % P) * stride, visited page
// by page; the arithmetic is the same either way, so a paged cache gives the contiguous bits.
template <class Visit>
void ForEachRow(const float* v, int64_t stride, int64_t n, const int32_t* block_table,
                int64_t page_size, const Visit& visit) {
  if (block_table == nullptr) {
    for (int64_t j = 0; j < n; ++j) visit(j, v + j * stride);
    return;
  }
  for (int64_t j0 = 0, page = 0; j0 < n; j0 += page_size, ++page) {
    const float* base = v + int64_t{block_table[page]} * page_size * stride;
    const int64_t rows = n - j0 < page_size ? n - j0 : page_size;
    for (int64_t r = 0; r < rows; ++r) visit(j0 + r, base + r * stride);
  }
}

void WeightedRowSumPaged(const float* HWY_RESTRICT p, const float* HWY_RESTRICT v, int64_t stride,
                         const int32_t* block_table, int64_t page_size, int64_t n, int64_t D,
                         float inv, float* HWY_RESTRICT out) {
  const DecodeTag d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto vi = hn::Set(d, inv);
  int64_t c = 0;
  for (; c + 4 * N <= D; c += 4 * N) {  // four independent chains per key
    auto a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    ForEachRow(v, stride, n, block_table, page_size, [&](int64_t j, const float* row) {
      const auto pj = hn::Set(d, p[j]);
      const float* vj = row + c;
      a0 = hn::MulAdd(pj, hn::LoadU(d, vj), a0);
      a1 = hn::MulAdd(pj, hn::LoadU(d, vj + N), a1);
      a2 = hn::MulAdd(pj, hn::LoadU(d, vj + 2 * N), a2);
      a3 = hn::MulAdd(pj, hn::LoadU(d, vj + 3 * N), a3);
    });
    hn::StoreU(hn::Mul(a0, vi), d, out + c);
    hn::StoreU(hn::Mul(a1, vi), d, out + c + N);
    hn::StoreU(hn::Mul(a2, vi), d, out + c + 2 * N);
    hn::StoreU(hn::Mul(a3, vi), d, out + c + 3 * N);
  }
  for (; c + N <= D; c += N) {
    auto a0 = hn::Zero(d);
    ForEachRow(v, stride, n, block_table, page_size, [&](int64_t j, const float* row) {
      a0 = hn::MulAdd(hn::Set(d, p[j]), hn::LoadU(d, row + c), a0);
    });
    hn::StoreU(hn::Mul(a0, vi), d, out + c);
  }
  const hn::CappedTag<float, 1> d1;
  for (; c < D; ++c) {
    auto a0 = hn::Zero(d1);
    ForEachRow(v, stride, n, block_table, page_size, [&](int64_t j, const float* row) {
      a0 = hn::MulAdd(hn::Set(d1, p[j]), hn::LoadU(d1, row + c), a0);
    });
    out[c] = hn::GetLane(hn::Mul(a0, hn::Set(d1, inv)));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "src/kernels/attention_kernels.h"

namespace ropekit {

HWY_EXPORT(ExpShiftSum);
HWY_EXPORT(SoftmaxGradRow);
HWY_EXPORT(ScoreRow);
HWY_EXPORT(WeightedRowSumPaged);

float ExpShiftSumSimd(float* x, int64_t n, float shift) {
  return HWY_DYNAMIC_DISPATCH(ExpShiftSum)(x, n, shift);
}

void SoftmaxGradRowSimd(const float* p, float* dp, int64_t n, float delta) {
  HWY_DYNAMIC_DISPATCH(SoftmaxGradRow)(p, dp, n, delta);
}

void ScoreRowSimd(const float* q, const float* k, int64_t stride, int64_t n, int64_t head_dim,
                  float scale, float* s) {
  HWY_DYNAMIC_DISPATCH(ScoreRow)(q, k, stride, n, head_dim, scale, s);
}

void WeightedRowSumSimd(const float* p, const float* v, int64_t stride, int64_t n, int64_t head_dim,
                        float inv, float* out) {
  HWY_DYNAMIC_DISPATCH(WeightedRowSumPaged)(p, v, stride, nullptr, 0, n, head_dim, inv, out);
}

void WeightedRowSumPagedSimd(const float* p, const float* v, int64_t stride,
                             const int32_t* block_table, int64_t page_size, int64_t n,
                             int64_t head_dim, float inv, float* out) {
  HWY_DYNAMIC_DISPATCH(WeightedRowSumPaged)
  (p, v, stride, block_table, page_size, n, head_dim, inv, out);
}

}  // namespace ropekit
#endif  // HWY_ONCE
